//! A sandbox: one VM, its agent connection, its share and its state dir.
//! One owner for every host-side resource, torn down on every path: by
//! [`Sandbox::teardown`] normally, by the fields' `Drop` otherwise (the VM is
//! killed first, then the share unmounted, then the state dir removed).

use std::time::{Duration, Instant};

use husk_hypervisor::accel::{self, HostProbe, SystemProbe};
use husk_hypervisor::{Hypervisor, HypervisorError, SharedFs, Vm, VmExit, VmSpec};
use husk_protocol::agent::Storage;
use husk_protocol::{
    AGENT_PORT_NAME, GUEST_SHARE_DIR, KERNEL_LOG_PARAM, KERNEL_SHARE_PARAM, SHARE_TAG,
};

use crate::agent::{AgentClient, AgentError, AgentInfo};
use crate::bundle::Bundle;
use crate::config::{Config, SharedFsKind};
use crate::sandbox_dir::{SandboxDir, SandboxDirError};
use crate::share::{Share, ShareError};
use crate::translate;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Dir(#[from] SandboxDirError),
    #[error(transparent)]
    Share(#[from] ShareError),
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("virtiofsd not found: install it with `cargo install virtiofsd` (make setup), set shared_fs.virtiofsd, or set shared_fs.kind = \"9p\"")]
    NoVirtiofsd,
    #[error("the VM died ({exit}) {when}; last guest console lines:\n{console}")]
    VmDied {
        exit: VmExit,
        when: &'static str,
        console: String,
    },
    #[error("cannot encode the guest spec")]
    Encode(#[from] serde_json::Error),
}

/// Where time went while a sandbox came up; logged with target `husk_timing`.
#[derive(Debug, Default, Clone, Copy)]
pub struct BootTimings {
    /// From launch to QEMU's sockets being ready.
    pub vm_start: Duration,
    /// From then to the agent answering `Check`.
    pub agent_ready: Duration,
}

pub struct Sandbox {
    // Field order is drop order: VM first, then the share, then the dir.
    vm: Box<dyn Vm>,
    agent: AgentClient,
    share: Share,
    dir: SandboxDir,
    shared_fs: SharedFs,
    info: AgentInfo,
    timings: BootTimings,
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

impl Sandbox {
    /// Boots a sandbox VM named `id` whose state lives in `dir`, and waits
    /// until its agent answers. On error everything made so far, `dir`
    /// included, is gone.
    pub async fn start(
        cfg: &Config,
        hv: &dyn Hypervisor,
        dir: SandboxDir,
        id: &str,
        agent_log: &str,
    ) -> Result<Sandbox, SandboxError> {
        let share = Share::create(&dir.share())?;
        let choice = accel::choose(cfg.hypervisor.accel, &SystemProbe);
        if let Some(n) = &choice.notice {
            // Quiet by default, like runc; `husk check` always shows it.
            tracing::info!("{n}");
        }
        let shared_fs = match cfg.shared_fs.kind {
            SharedFsKind::NineP => SharedFs::NineP,
            SharedFsKind::Virtiofs => SharedFs::Virtiofs {
                daemon: cfg.find_virtiofsd().ok_or(SandboxError::NoVirtiofsd)?,
                socket: dir.virtiofsd_socket(),
            },
            SharedFsKind::Auto => match cfg.find_virtiofsd() {
                Some(daemon) => SharedFs::Virtiofs {
                    daemon,
                    socket: dir.virtiofsd_socket(),
                },
                None => {
                    tracing::info!("virtiofsd not found; sharing files over 9p");
                    SharedFs::NineP
                }
            },
        };
        let mut kernel_params = vec![
            format!("{KERNEL_LOG_PARAM}={agent_log}"),
            format!("{KERNEL_SHARE_PARAM}={}", shared_fs.driver()),
        ];
        kernel_params.extend(accel::tcg_clock_params(choice.accel, SystemProbe.tsc_khz()));
        kernel_params.extend(cfg.hypervisor.kernel_params.iter().cloned());
        let spec = VmSpec {
            name: id.to_string(),
            qemu: cfg.hypervisor.path.clone(),
            kernel: cfg.hypervisor.kernel.clone(),
            initrd: cfg.hypervisor.initrd.clone(),
            accel: choice.accel,
            vcpus: cfg.hypervisor.vcpus,
            memory_mib: cfg.hypervisor.memory_mib,
            kernel_params,
            share_dir: share.dir().to_path_buf(),
            shared_fs: shared_fs.clone(),
            share_tag: SHARE_TAG.to_string(),
            agent_port: AGENT_PORT_NAME.to_string(),
            agent_socket: dir.agent_socket(),
            qmp_socket: dir.qmp_socket(),
            console_log: dir.console_log(),
            hypervisor_log: dir.hypervisor_log(),
            host_cpus: cfg.hypervisor.host_cpus.clone(),
        };
        let t0 = Instant::now();
        let mut vm = hv.launch(&spec).await?;
        let vm_start = t0.elapsed();
        let agent = AgentClient::connect(&dir.agent_socket()).await?;
        let boot_timeout = Duration::from_secs(cfg.agent.boot_timeout_secs);
        let info = tokio::select! {
            r = agent.handshake(boot_timeout) => match r {
                Ok(info) => info,
                Err(e) => {
                    let console = console_tail(&dir);
                    tracing::error!("guest console:\n{console}");
                    return Err(e.into());
                }
            },
            exit = vm.wait() => {
                return Err(SandboxError::VmDied { exit, when: "while booting", console: console_tail(&dir) });
            }
        };
        let timings = BootTimings {
            vm_start,
            agent_ready: t0.elapsed() - vm_start,
        };
        tracing::info!(
            target: "husk_timing",
            vm_start_ms = timings.vm_start.as_secs_f64() * 1e3,
            agent_ready_ms = timings.agent_ready.as_secs_f64() * 1e3,
            accel = %choice.accel,
            shared_fs = shared_fs.driver(),
            kernel = %info.kernel_release,
            "sandbox ready"
        );
        Ok(Sandbox {
            vm,
            agent,
            share,
            dir,
            shared_fs,
            info,
            timings,
        })
    }

    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    pub fn info(&self) -> &AgentInfo {
        &self.info
    }

    pub fn timings(&self) -> BootTimings {
        self.timings
    }

    pub fn dir(&self) -> &SandboxDir {
        &self.dir
    }

    pub fn dir_mut(&mut self) -> &mut SandboxDir {
        &mut self.dir
    }

    /// Waits until the VM exits (it should not while a container runs).
    pub async fn wait_vm(&mut self) -> VmExit {
        self.vm.wait().await
    }

    /// The error for a VM that died at `when`.
    pub fn died(&self, exit: VmExit, when: &'static str) -> SandboxError {
        SandboxError::VmDied {
            exit,
            when,
            console: console_tail(&self.dir),
        }
    }

    /// Freezes the whole VM.
    pub async fn pause(&mut self) -> Result<(), SandboxError> {
        Ok(self.vm.pause().await?)
    }

    pub async fn resume(&mut self) -> Result<(), SandboxError> {
        Ok(self.vm.resume().await?)
    }

    pub fn vm_pid(&self) -> u32 {
        self.vm.pid()
    }

    /// Shares the bundle's rootfs and bind sources with the guest and has the
    /// agent build the container (its init held before exec).
    pub async fn create_container(
        &mut self,
        cid: &str,
        bundle: &Bundle,
    ) -> Result<(), SandboxError> {
        let guest = translate::guest_spec(&bundle.spec, cid, &bundle.dir, &bundle.rootfs);
        for b in &guest.binds {
            self.share.bind(b)?;
        }
        let json = serde_json::to_vec(&guest.spec)?;
        let storage = Storage {
            driver: self.shared_fs.driver().to_string(),
            source: SHARE_TAG.to_string(),
            mount_point: GUEST_SHARE_DIR.to_string(),
            ..Default::default()
        };
        let agent = self.agent.clone();
        self.while_alive(
            "while creating the container",
            agent.create_container(cid, json, vec![storage]),
        )
        .await
    }

    /// Runs `fut` (a call to the agent) unless the VM dies first.
    pub async fn while_alive<T, E, F>(
        &mut self,
        when: &'static str,
        fut: F,
    ) -> Result<T, SandboxError>
    where
        F: std::future::Future<Output = Result<T, E>>,
        E: Into<SandboxError>,
    {
        let r = tokio::select! {
            r = fut => r.map_err(Into::into),
            exit = self.vm.wait() => Err(SandboxError::VmDied {
                exit,
                when,
                console: console_tail(&self.dir),
            }),
        };
        // A VM that dies breaks the agent connection, and that may be seen
        // first: name the cause, not the symptom.
        if let Err(SandboxError::Agent(AgentError::Unavailable(_))) = &r {
            if let Ok(exit) = tokio::time::timeout(Duration::from_secs(2), self.vm.wait()).await {
                return Err(SandboxError::VmDied {
                    exit,
                    when,
                    console: console_tail(&self.dir),
                });
            }
        }
        r
    }

    /// Stops the VM and removes every host-side trace of the sandbox.
    pub async fn teardown(mut self) {
        if let Err(e) = self.vm.shutdown(Duration::from_secs(3)).await {
            tracing::warn!(error = %e, "stopping the VM");
        }
        if tracing::enabled!(tracing::Level::DEBUG) {
            tracing::debug!(
                "guest console log:\n{}",
                husk_hypervisor::log_tail(&self.dir.console_log(), 64 * 1024)
            );
            tracing::debug!(
                "qemu log:\n{}",
                husk_hypervisor::log_tail(&self.dir.hypervisor_log(), 16 * 1024)
            );
        }
        self.share.teardown();
        self.dir.remove();
    }
}

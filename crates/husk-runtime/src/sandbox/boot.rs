//! Booting a sandbox VM: the share, the acceleration choice, the shared
//! filesystem, the kernel command line, QEMU through the [`Hypervisor`]
//! trait, and the agent's handshake. Returns the [`Parts`] the lifecycle
//! model ([`super::Sandbox`]) is made of.

use std::time::{Duration, Instant};

use husk_hypervisor::accel::{self, HostProbe};
use husk_hypervisor::{Hypervisor, SharedFs, Vm, VmSpec};
use husk_protocol::{AGENT_PORT_NAME, KERNEL_LOG_PARAM, KERNEL_SHARE_PARAM, SHARE_TAG};

use super::{console_tail, Parts, SandboxError};
use crate::agent::{AgentClient, TtrpcConn};
use crate::config::{Config, SharedFsKind};
use crate::sandbox_dir::SandboxDir;
use crate::share::Share;

/// Boots a VM named `id` whose state lives in `dir`, and waits until its
/// agent answers. On error everything made so far, `dir` included, is gone.
pub async fn boot(
    cfg: &Config,
    hv: &dyn Hypervisor,
    probe: &(dyn HostProbe + Sync),
    dir: SandboxDir,
    id: &str,
    agent_log: &str,
) -> Result<Parts, SandboxError> {
    let share = Share::create(&dir.share())?;
    let choice = accel::choose(cfg.hypervisor.accel, probe);
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
        // 9p is served by QEMU itself, as root: never a silent fallback.
        SharedFsKind::Auto => SharedFs::Virtiofs {
            daemon: cfg.find_virtiofsd().ok_or(SandboxError::NoVirtiofsd)?,
            socket: dir.virtiofsd_socket(),
        },
    };
    // QEMU drops to a leased uid unless it serves 9p (which must read and
    // chown root's files: it stays root, under its seccomp sandbox).
    let uid_pool = match shared_fs {
        SharedFs::Virtiofs { .. } => Some(husk_hypervisor::UidPool {
            first: cfg.hypervisor.uid_first,
            count: cfg.hypervisor.uid_count,
            lock_dir: cfg.hypervisor.uid_lock_dir.clone(),
        }),
        SharedFs::NineP => None,
    };
    let mut kernel_params = vec![
        format!("{KERNEL_LOG_PARAM}={agent_log}"),
        format!("{KERNEL_SHARE_PARAM}={}", shared_fs.driver()),
    ];
    kernel_params.extend(accel::tcg_clock_params(choice.accel, probe.tsc_khz()));
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
        console_log_limit: cfg.hypervisor.console_log_limit_bytes,
        uid_pool,
        hypervisor_log: dir.hypervisor_log(),
        host_cpus: cfg.hypervisor.host_cpus.clone(),
    };
    let t0 = Instant::now();
    let mut vm: Box<dyn Vm> = hv.launch(&spec).await?;
    let vm_start = t0.elapsed();
    let conn = TtrpcConn::connect(&dir.agent_socket()).await?;
    let agent = AgentClient::new(std::sync::Arc::new(conn));
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
    tracing::info!(
        target: "husk_timing",
        vm_start_ms = vm_start.as_secs_f64() * 1e3,
        agent_ready_ms = (t0.elapsed() - vm_start).as_secs_f64() * 1e3,
        accel = %choice.accel,
        shared_fs = shared_fs.driver(),
        kernel = %info.kernel_release,
        "sandbox ready"
    );
    Ok(Parts {
        vm,
        agent,
        share: Box::new(TrackedShare {
            share,
            binds: Default::default(),
        }),
        dir,
        info,
        shared_fs: shared_fs.driver(),
    })
}

/// The share with each container's binds tracked.
// TODO(merge): Share itself tracks binds per container (share-harden).
struct TrackedShare {
    share: Share,
    binds: std::collections::HashMap<String, Vec<std::path::PathBuf>>,
}

impl super::ShareBinds for TrackedShare {
    fn bind_container(
        &mut self,
        cid: &str,
        binds: &[crate::translate::ShareBind],
    ) -> Result<(), crate::share::ShareError> {
        let mut done: Vec<std::path::PathBuf> = Vec::new();
        for b in binds {
            if let Err(e) = self.share.bind(b) {
                for t in done.iter().rev() {
                    let _ = unbind(t);
                }
                return Err(e);
            }
            done.push(self.share.dir().join(&b.share_path));
        }
        self.binds.insert(cid.to_string(), done);
        Ok(())
    }

    fn unbind_container(&mut self, cid: &str) -> Result<(), crate::share::ShareError> {
        for t in self.binds.remove(cid).unwrap_or_default().iter().rev() {
            if let Err(errno) = unbind(t) {
                return Err(crate::share::ShareError::Bind {
                    source_path: t.clone(),
                    errno,
                });
            }
        }
        Ok(())
    }

    fn teardown(&mut self) {
        self.share.teardown();
    }
}

/// Detaches the bind at `target` and leaves an empty self-bind of the mount
/// point, which the share's teardown still finds to unmount.
fn unbind(target: &std::path::Path) -> Result<(), nix::Error> {
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    umount2(target, MntFlags::MNT_DETACH)?;
    mount(
        Some(target),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
}

impl super::Sandbox {
    /// Boots a sandbox in `dir` for its owner container (id = the dir's
    /// name, bundle `owner`), sized from the owner's spec; this process is
    /// recorded as the sandbox's owner. On error nothing of it remains.
    #[allow(clippy::too_many_arguments)]
    pub async fn launch(
        cfg: &Config,
        hv: &dyn Hypervisor,
        probe: &(dyn HostProbe + Sync),
        dir: SandboxDir,
        id: &str,
        owner: &crate::bundle::Bundle,
        agent_log: &str,
        host_pid: super::HostPid,
    ) -> Result<std::sync::Arc<super::Sandbox>, SandboxError> {
        let sized = crate::sizing::vm_config(cfg, &owner.spec, &crate::sizing::Host::probe())
            .map_err(SandboxError::Sizing)?;
        let me = std::process::id() as i32;
        let record = crate::state::ContainerState {
            id: id.to_string(),
            bundle: owner.dir.clone(),
            rootfs: owner.rootfs.clone(),
            status: crate::status::Status::Creating,
            pid: me,
            pid_start_time: crate::state::process_start_time(me).unwrap_or(0),
            created: crate::state::now_rfc3339(),
            annotations: owner
                .spec
                .annotations()
                .clone()
                .unwrap_or_default()
                .into_iter()
                .collect(),
            owner: String::new(),
            exit_status: None,
            vm_pid: None,
            poststop: Vec::new(),
        };
        // A failed save leaves `dir` to its Drop, which removes it.
        record.save(dir.path())?;
        let t0 = Instant::now();
        let parts = boot(&sized, hv, probe, dir, id, agent_log).await?;
        tracing::info!(
            target: "husk_timing",
            boot_ms = t0.elapsed().as_secs_f64() * 1e3,
            vcpus = sized.hypervisor.vcpus,
            memory_mib = sized.hypervisor.memory_mib,
            "sandbox booted"
        );
        Ok(super::Sandbox::new(parts, record, host_pid))
    }
}

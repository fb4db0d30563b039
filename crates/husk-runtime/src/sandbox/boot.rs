//! Booting a sandbox VM: the share, the acceleration choice, the shared
//! filesystem, the kernel command line, QEMU through the [`Hypervisor`]
//! trait, and the agent's handshake. Returns the [`Parts`] the lifecycle
//! model ([`super::Sandbox`]) is made of.

use std::time::Duration;

use tracing::Instrument;

use husk_hypervisor::accel::{self, HostProbe};
use husk_hypervisor::{Accel, GuestMemory, Hypervisor, SharedFs, Vm, VmSpec};
use husk_protocol::{AGENT_PORT_NAME, KERNEL_LOG_PARAM, KERNEL_SHARE_PARAM, SHARE_TAG};

use super::{console_tail, Parts, SandboxError};
use crate::agent::{AgentClient, TtrpcConn};
use crate::config::{Config, SharedFsKind};
use crate::host_cgroup::{HostCgroup, Limits};
use crate::sandbox_dir::SandboxDir;
use crate::share::Share;
use crate::template;
use crate::timing::TIMING;

/// Boots a VM named `id` whose state lives in `dir`, and waits until its
/// agent answers. With `templated`, the VM is restored from the VM
/// template of this configuration (built first if there is none; a build
/// that fails is logged and the VM boots instead). On error everything
/// made so far, `dir` included, is gone.
#[allow(clippy::too_many_arguments)]
pub async fn boot(
    cfg: &Config,
    hv: &dyn Hypervisor,
    probe: &(dyn HostProbe + Sync),
    dir: SandboxDir,
    id: &str,
    agent_log: &str,
    nics: Vec<husk_hypervisor::Nic>,
    netns: Option<husk_hypervisor::Netns>,
    templated: bool,
) -> Result<Parts, SandboxError> {
    let share = Share::create(&dir.share_staging(), &dir.share())?;
    let choice = accel::choose(cfg.hypervisor.accel, probe);
    if let Some(n) = &choice.notice {
        // Quiet by default, like runc; `husk check` always shows it.
        tracing::info!("{n}");
    }
    let template = if templated {
        let machine = Machine::new(cfg, choice.accel, probe, agent_log, true);
        match template::ensure(cfg, hv, &machine).await {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!(
                    "booting without a VM template: {}",
                    crate::monitor::error_chain(&e)
                );
                None
            }
        }
    } else {
        None
    };
    let machine = Machine::new(cfg, choice.accel, probe, agent_log, template.is_some());
    let shared_fs = match (cfg.shared_fs.kind, &template) {
        (SharedFsKind::NineP, _) | (SharedFsKind::Auto, Some(_)) => SharedFs::NineP,
        // 9p is served by QEMU itself, as root: never a silent fallback.
        (SharedFsKind::Virtiofs, _) | (SharedFsKind::Auto, None) => SharedFs::Virtiofs {
            daemon: cfg.find_virtiofsd().ok_or(SandboxError::NoVirtiofsd)?,
            socket: dir.virtiofsd_socket(),
        },
    };
    let memory = match &template {
        Some(t) => GuestMemory::TemplateRestore {
            file: t.memory(),
            state: t.state(),
        },
        None => GuestMemory::Fresh,
    };
    let mut nics = nics;
    if template.is_some() && nics.is_empty() {
        // The template's NIC is there whether or not it gets a tap.
        nics.push(template::template_nic());
    }
    let spec = machine.spec(
        id,
        &shared_fs,
        VmPaths {
            share_dir: share.dir().to_path_buf(),
            agent_socket: dir.agent_socket(),
            qmp_socket: dir.qmp_socket(),
            console_log: dir.console_log(),
            hypervisor_log: dir.hypervisor_log(),
        },
        nics,
        netns,
        memory,
    );
    let mut vm: Box<dyn Vm> = hv
        .launch(&spec)
        .instrument(tracing::info_span!(target: TIMING, "vm_start"))
        .await?;
    // The sockets QEMU and virtiofsd made: 0600 whatever the umask.
    for sock in [dir.agent_socket(), dir.qmp_socket(), dir.virtiofsd_socket()] {
        match crate::sandbox_dir::restrict(&sock, 0o600) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(path = %sock.display(), error = %e, "cannot restrict socket")
            }
            _ => {}
        }
    }
    let ready = tracing::info_span!(target: TIMING, "agent_ready");
    let conn = TtrpcConn::connect(&dir.agent_socket())
        .instrument(ready.clone())
        .await?;
    let agent = AgentClient::new(std::sync::Arc::new(conn));
    let boot_timeout = Duration::from_secs(cfg.agent.boot_timeout_secs);
    let handshake = async {
        let info = agent.handshake(boot_timeout).await?;
        if template.is_some() {
            // Every clone starts with the template's RNG state, clock and
            // hostname: renew them before any container runs.
            agent.done(template::renew_identity(id)?).await?;
        }
        Ok::<_, SandboxError>(info)
    }
    .instrument(ready);
    let info = tokio::select! {
        r = handshake => match r {
            Ok(info) => info,
            Err(e) => {
                let console = console_tail(&dir);
                tracing::error!("guest console:\n{console}");
                return Err(e);
            }
        },
        exit = vm.wait() => {
            return Err(SandboxError::VmDied { exit, when: "while booting", console: console_tail(&dir) });
        }
    };
    tracing::info!(
        accel = %choice.accel,
        shared_fs = shared_fs.driver(),
        kernel = %info.kernel_release,
        template = template.as_ref().map(|t| t.id.as_str()).unwrap_or("none"),
        "sandbox ready"
    );
    Ok(Parts {
        vm,
        agent,
        share: Box::new(share),
        dir,
        info,
        shared_fs: shared_fs.driver(),
        host_cgroup: None,
        network: None,
        guest_network: None,
    })
}

/// Where one VM's sockets, logs and share are.
pub(crate) struct VmPaths {
    pub share_dir: std::path::PathBuf,
    pub agent_socket: std::path::PathBuf,
    pub qmp_socket: std::path::PathBuf,
    pub console_log: std::path::PathBuf,
    pub hypervisor_log: std::path::PathBuf,
}

/// What every VM of a configuration is, whichever sandbox it is for: what
/// a VM template saves, and what a sandbox restored from it must match.
pub(crate) struct Machine {
    pub cfg: Config,
    pub accel: Accel,
    pub kernel_params: Vec<String>,
}

impl Machine {
    /// With `templated`, the share is not named on the kernel command line
    /// (the agent would mount it at boot, and a mounted 9p export cannot be
    /// saved): the first CreateContainer mounts it.
    pub fn new(
        cfg: &Config,
        accel: Accel,
        probe: &(dyn HostProbe + Sync),
        agent_log: &str,
        templated: bool,
    ) -> Machine {
        let mut kernel_params = vec![format!("{KERNEL_LOG_PARAM}={agent_log}")];
        if !templated {
            let driver = match cfg.shared_fs.kind {
                SharedFsKind::NineP => "9p",
                SharedFsKind::Virtiofs | SharedFsKind::Auto => "virtiofs",
            };
            kernel_params.push(format!("{KERNEL_SHARE_PARAM}={driver}"));
        }
        kernel_params.extend(accel::tcg_clock_params(accel, probe.tsc_khz()));
        kernel_params.extend(cfg.hypervisor.kernel_params.iter().cloned());
        Machine {
            cfg: cfg.clone(),
            accel,
            kernel_params,
        }
    }

    /// The VM of sandbox `name`.
    pub fn spec(
        &self,
        name: &str,
        shared_fs: &SharedFs,
        paths: VmPaths,
        nics: Vec<husk_hypervisor::Nic>,
        netns: Option<husk_hypervisor::Netns>,
        memory: GuestMemory,
    ) -> VmSpec {
        let h = &self.cfg.hypervisor;
        // QEMU drops to a leased uid unless it serves 9p (which must read
        // and chown root's files: it stays root, under its seccomp sandbox).
        let uid_pool = match shared_fs {
            SharedFs::Virtiofs { .. } => Some(husk_hypervisor::UidPool {
                first: h.uid_first,
                count: h.uid_count,
                lock_dir: h.uid_lock_dir.clone(),
            }),
            SharedFs::NineP => None,
        };
        VmSpec {
            name: name.to_string(),
            qemu: h.path.clone(),
            kernel: h.kernel.clone(),
            initrd: h.initrd.clone(),
            accel: self.accel,
            vcpus: h.vcpus,
            memory_mib: h.memory_mib,
            kernel_params: self.kernel_params.clone(),
            share_dir: paths.share_dir,
            shared_fs: shared_fs.clone(),
            share_tag: SHARE_TAG.to_string(),
            agent_port: AGENT_PORT_NAME.to_string(),
            agent_socket: paths.agent_socket,
            qmp_socket: paths.qmp_socket,
            console_log: paths.console_log,
            console_log_limit: h.console_log_limit_bytes,
            uid_pool,
            hypervisor_log: paths.hypervisor_log,
            host_cpus: h.host_cpus.clone(),
            nics,
            netns,
            memory,
            tcg_tb_size_mib: h.tcg_tb_size_mib,
        }
    }
}

impl super::Sandbox {
    /// Boots a sandbox in `dir` for its owner container (id = the dir's
    /// name, bundle `owner`), sized from the owner's spec; this process is
    /// recorded as the sandbox's owner. On error nothing of it remains.
    #[allow(clippy::too_many_arguments)]
    #[tracing::instrument(target = "husk_timing", name = "pod_boot", skip_all, fields(sandbox = id))]
    pub async fn launch(
        cfg: &Config,
        hv: &dyn Hypervisor,
        probe: &(dyn HostProbe + Sync),
        dir: SandboxDir,
        id: &str,
        owner: &crate::bundle::Bundle,
        agent_log: &str,
        host_pid: super::HostPid,
        annotations: crate::sizing::Annotations,
    ) -> Result<std::sync::Arc<super::Sandbox>, SandboxError> {
        let host = crate::sizing::Host::probe();
        let sized = crate::sizing::vm_config(cfg, &owner.spec, &host, annotations)
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
        // QEMU and virtiofsd are started by this process, so they start
        // in its cgroup: join the sandbox's before booting.
        let host_cgroup = join_host_cgroup(&sized, owner, id)?;
        if let Some(cg) = &host_cgroup {
            // For whoever cleans up after this process, should it die.
            let list: String = cg
                .made()
                .iter()
                .map(|p| format!("{}\n", p.display()))
                .collect();
            let file = dir.path().join(crate::sandbox_dir::HOST_CGROUP_FILE);
            if let Err(e) = std::fs::write(&file, list) {
                tracing::warn!(path = %file.display(), error = %e, "cannot record the host cgroup");
            }
        }
        let (mut network, vm_netns) = attach_network(owner, &dir, host_pid)?;
        let nic_count = network.as_ref().map(|(n, _)| n.nic_count()).unwrap_or(0);
        let templated = match template::eligible(cfg, &sized, nic_count) {
            Ok(()) => true,
            Err(why) => {
                tracing::debug!("booting the guest, not restoring a template: {why}");
                false
            }
        };
        if let (true, Some((net, guest))) = (templated, network.as_mut()) {
            net.set_boot_mac(template::TEMPLATE_NIC_MAC, guest);
        }
        let nics = network.as_ref().map(|(n, _)| n.nics()).unwrap_or_default();
        let mut parts = boot(
            &sized, hv, probe, dir, id, agent_log, nics, vm_netns, templated,
        )
        .await?;
        parts.host_cgroup = host_cgroup;
        if let Some((net, guest)) = network {
            parts.network = Some(net);
            parts.guest_network = Some(guest);
        }
        tracing::info!(
            vcpus = sized.hypervisor.vcpus,
            memory_mib = sized.hypervisor.memory_mib,
            "sandbox booted"
        );
        Ok(super::Sandbox::new(parts, record, host_pid))
    }
}

/// The sandbox's network on the host and what the guest is to be told of
/// it, and the namespace QEMU must run in (if not husk's).
type AttachedNetwork = (
    Option<(crate::net::HostNetwork, crate::net::GuestNetwork)>,
    Option<husk_hypervisor::Netns>,
);

/// Carries the interfaces of the network namespace the owner's spec names
/// into the VM (`net.rs`). A namespace that has none yet but hooks that
/// run before start (which may add some) gets a spare NIC. For a spec that
/// asks for a new namespace without naming one, the namespace is the CLI
/// monitor's own (`net::enter_own_netns`, only hooks can fill it), or, when
/// the shim reports QEMU's pid, a new one QEMU is started in (returned,
/// with a spare NIC: ctr's CNI configures it after create).
fn attach_network(
    owner: &crate::bundle::Bundle,
    dir: &SandboxDir,
    host_pid: super::HostPid,
) -> Result<AttachedNetwork, SandboxError> {
    use crate::net::{self, HostNetwork};
    let hooks = owner.spec.hooks().clone().unwrap_or_default();
    let spare = hooks.prestart().as_ref().is_some_and(|h| !h.is_empty())
        || hooks
            .create_runtime()
            .as_ref()
            .is_some_and(|h| !h.is_empty());
    let unnamed = net::wants_new_netns(&owner.spec);
    let (mut net, guest, vm_netns) = match net::spec_netns(&owner.spec) {
        Some(path) => {
            let (n, g) = HostNetwork::attach(&path, spare)?;
            (n, g, None)
        }
        None if unnamed && host_pid == super::HostPid::Vm => {
            let ns = std::sync::Arc::new(net::new_netns()?);
            let n = HostNetwork::attach_new(ns.clone())?;
            (n, Default::default(), Some(husk_hypervisor::Netns(ns)))
        }
        None => match net::own_netns() {
            Some(path) if spare && unnamed => {
                let (n, g) = HostNetwork::attach(&path, true)?;
                (n, g, None)
            }
            _ => return Ok((None, None)),
        },
    };
    net.record_in(dir.path());
    Ok((Some((net, guest)), vm_netns))
}

/// Makes the sandbox's host cgroup (`linux.cgroupsPath` of its owner, or
/// one named after it below this process's own), limited to the VM's size
/// plus `limits.host_overhead_mib`, and moves this process into it. A
/// cgroup the spec names must work; without one, a failure is logged and
/// the sandbox runs where this process does.
fn join_host_cgroup(
    sized: &Config,
    owner: &crate::bundle::Bundle,
    id: &str,
) -> Result<Option<HostCgroup>, SandboxError> {
    let asked = owner
        .spec
        .linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().clone())
        .map(|p| p.to_string_lossy().into_owned())
        .filter(|p| !p.is_empty());
    let limits = Limits::for_vm(
        sized.hypervisor.memory_mib,
        sized.hypervisor.vcpus,
        sized.limits.host_overhead_mib,
    );
    let joined = HostCgroup::create(asked.as_deref().unwrap_or(""), id, &limits)
        .and_then(|cg| cg.add(std::process::id()).map(|()| cg));
    match (joined, asked) {
        (Ok(cg), _) => Ok(Some(cg)),
        (Err(e), Some(_)) => Err(e.into()),
        (Err(e), None) => {
            tracing::warn!(
                "the sandbox runs without a host cgroup of its own: {}",
                crate::monitor::error_chain(&e)
            );
            Ok(None)
        }
    }
}

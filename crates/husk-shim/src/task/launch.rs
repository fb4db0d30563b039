//! How the shim boots a pod's sandbox: the one seam between the task
//! service and QEMU, so the service can be driven over fakes in tests.

use std::sync::Arc;

use async_trait::async_trait;
use husk_hypervisor::qemu::Qemu;
use husk_hypervisor::SystemProbe;
use husk_runtime::bundle::Bundle;
use husk_runtime::config::Config;
use husk_runtime::sandbox::{HostPid, Sandbox, SandboxError};
use husk_runtime::sandbox_dir::SandboxDir;
use husk_runtime::sizing::Annotations;

/// Boots the sandbox of pod `id` in `dir`, sized from its owner's bundle.
#[async_trait]
pub trait Launch: Send + Sync {
    async fn launch(
        &self,
        cfg: &Config,
        dir: SandboxDir,
        id: &str,
        owner: &Bundle,
        agent_log: &str,
    ) -> Result<Arc<Sandbox>, SandboxError>;
}

/// A real VM under QEMU, probed on this host, sized by the CRI sandbox
/// annotations too (this is the CRI path); containerd's pid for every
/// process of the pod is QEMU's.
pub struct QemuLaunch;

#[async_trait]
impl Launch for QemuLaunch {
    async fn launch(
        &self,
        cfg: &Config,
        dir: SandboxDir,
        id: &str,
        owner: &Bundle,
        agent_log: &str,
    ) -> Result<Arc<Sandbox>, SandboxError> {
        Sandbox::launch(
            cfg,
            &Qemu,
            &SystemProbe,
            dir,
            id,
            owner,
            agent_log,
            HostPid::Vm,
            Annotations::Honoured,
        )
        .await
    }
}

//! The hypervisor side of husk: the [`Hypervisor`] factory and [`Vm`] handle
//! traits, the [`VmSpec`] that describes a sandbox VM, the KVM/TCG acceleration
//! probe, and the QEMU implementation.
//!
//! This crate depends on nothing else in the workspace (see docs/architecture.md).

pub mod accel;
pub mod caplog;
mod process;
pub mod qemu;
mod spec;
pub mod uid;
pub mod virtiofsd;

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;

pub use accel::{Accel, AccelMode, HostProbe, SystemProbe};
pub use process::log_tail;
pub use spec::{GuestMemory, Netns, Nic, SharedFs, VmSpec};
pub use uid::{UidError, UidLease, UidPool};

/// Errors of launching, driving and stopping a VM.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// A binary the VM needs is not where the configuration says.
    #[error("{what} not found at {path}: {fix}")]
    MissingBinary {
        what: &'static str,
        path: PathBuf,
        fix: &'static str,
    },
    /// A file the VM boots from is missing.
    #[error(
        "{what} not found at {path}: build it with `make guest` or set `{key}` in the husk config"
    )]
    MissingFile {
        what: &'static str,
        path: PathBuf,
        key: &'static str,
    },
    /// QEMU runs as an unprivileged uid and could not read a boot file.
    #[error("{what} {path} is not readable by QEMU's unprivileged uid ({blocker} is not world-readable/searchable): `chmod o+r` the file and `o+x` its directories, or set `{key}` to a copy that is")]
    NotReadable {
        what: &'static str,
        path: PathBuf,
        blocker: PathBuf,
        key: &'static str,
    },
    #[error("failed to start {what}")]
    Spawn {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A helper process exited before it was ready.
    #[error("{what} exited during start-up ({status}): {output}")]
    EarlyExit {
        what: &'static str,
        status: String,
        output: String,
    },
    #[error("QMP")]
    Qmp(#[from] qemu::qmp::QmpError),
    #[error("cannot run QEMU unprivileged")]
    Uid(#[from] UidError),
    /// Building or restoring from a VM template failed.
    #[error("{0}")]
    Template(String),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The hypervisor exited with this code (0 after a guest power-off or reset).
    Code(i32),
    /// The hypervisor was killed by this signal.
    Signal(i32),
    /// A helper the VM cannot live without (virtiofsd) exited, so the VM
    /// was stopped.
    HelperExited {
        helper: &'static str,
        status: String,
    },
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::Code(c) => write!(f, "exit code {c}"),
            VmExit::Signal(s) => write!(f, "killed by signal {s}"),
            VmExit::HelperExited { helper, status } => {
                write!(f, "{helper} exited ({status}), so the VM was stopped")
            }
        }
    }
}

/// A factory of VMs.
#[async_trait]
pub trait Hypervisor: Send + Sync {
    /// Starts a VM described by `spec` and returns once its agent endpoint
    /// exists (not once the guest has booted).
    async fn launch(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, HypervisorError>;
}

/// A running VM. Dropping the handle kills the VM and its helper processes.
#[async_trait]
pub trait Vm: Send {
    /// Host pid of the hypervisor process.
    fn pid(&self) -> u32;
    /// Waits until the VM has exited.
    async fn wait(&mut self) -> VmExit;
    /// Stops the VM: asks the hypervisor to quit, kills it after `grace`, and
    /// stops every helper process. Idempotent.
    async fn shutdown(&mut self, grace: Duration) -> Result<VmExit, HypervisorError>;
    /// Stops the guest's vCPUs (the whole VM is frozen; memory stays).
    async fn pause(&mut self) -> Result<(), HypervisorError>;
    /// Lets a paused guest run again.
    async fn resume(&mut self) -> Result<(), HypervisorError>;
    /// Saves a template booted with [`GuestMemory::TemplateBuild`]: stops
    /// the guest and writes its device state (not its RAM, which is in the
    /// memory file already) to `state`. The VM stays paused; shut it down
    /// after.
    async fn save_template(&mut self, state: &std::path::Path) -> Result<(), HypervisorError>;
}

//! [`VmSpec`]: everything a hypervisor needs to start one sandbox VM.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use crate::{Accel, UidPool};

/// How the sandbox's shared directory reaches the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SharedFs {
    /// virtio-fs through a `virtiofsd` daemon (needs shared guest memory).
    Virtiofs {
        /// The virtiofsd binary.
        daemon: PathBuf,
        /// The vhost-user socket virtiofsd listens on.
        socket: PathBuf,
    },
    /// virtio-9p served by QEMU itself.
    NineP,
}

impl SharedFs {
    /// The driver name the guest agent mounts it with.
    pub fn driver(&self) -> &'static str {
        match self {
            SharedFs::Virtiofs { .. } => "virtiofs",
            SharedFs::NineP => "9p",
        }
    }
}

/// A NIC of the VM: a virtio-net device backed by a tap device the caller
/// opened (`-netdev tap,fd=`; QEMU gets a copy of the descriptor).
#[derive(Debug, Clone)]
pub struct Nic {
    /// `None`: a device with no backend (a template's NIC, which gets its
    /// tap when a sandbox is restored from the template).
    pub tap: Option<Arc<OwnedFd>>,
    /// The NIC's MAC in the guest.
    pub mac: [u8; 6],
}

impl PartialEq for Nic {
    fn eq(&self, other: &Nic) -> bool {
        let fd = |n: &Nic| n.tap.as_ref().map(|t| t.as_raw_fd());
        self.mac == other.mac && fd(self) == fd(other)
    }
}
impl Eq for Nic {}

impl Nic {
    /// `aa:bb:cc:dd:ee:ff`.
    pub fn mac_string(&self) -> String {
        self.mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    }
}

/// A host network namespace, by a descriptor of it.
#[derive(Debug, Clone)]
pub struct Netns(pub Arc<OwnedFd>);

impl PartialEq for Netns {
    fn eq(&self, other: &Netns) -> bool {
        self.0.as_raw_fd() == other.0.as_raw_fd()
    }
}
impl Eq for Netns {}

/// Where the guest's RAM comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestMemory {
    /// Fresh memory: anonymous, or a shared memfd when virtio-fs needs it.
    Fresh,
    /// Booting a template: RAM is a shared mapping of `file` (QEMU creates
    /// it), so what the guest writes is in the file when the VM is saved
    /// ([`crate::Vm::save_template`]).
    TemplateBuild { file: PathBuf },
    /// Restored from a template: RAM is a private (copy-on-write) mapping of
    /// the template's memory `file`, so every sandbox restored from it
    /// shares the pages it has not written; the device state comes from
    /// `state` (`-incoming`, with `x-ignore-shared`). The VM runs once the
    /// state is loaded.
    TemplateRestore { file: PathBuf, state: PathBuf },
}

/// One sandbox VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    /// Short name, shown in `ps` as `-name husk-<name>`.
    pub name: String,
    pub qemu: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub accel: Accel,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Extra kernel parameters, appended after the built-in ones.
    pub kernel_params: Vec<String>,
    /// Host directory exported to the guest as the sandbox share.
    pub share_dir: PathBuf,
    pub shared_fs: SharedFs,
    /// Tag of the share device (the guest mounts it by this name).
    pub share_tag: String,
    /// virtio-serial port name of the agent channel.
    pub agent_port: String,
    /// Unix socket QEMU listens on for the agent channel.
    pub agent_socket: PathBuf,
    /// Unix socket QEMU listens on for QMP.
    pub qmp_socket: PathBuf,
    /// File that receives the guest console (kernel and agent logs).
    pub console_log: PathBuf,
    /// The console log never grows past this many bytes (its tail is kept).
    pub console_log_limit: u64,
    /// Where QEMU's uid comes from: `Some`, QEMU runs as a leased
    /// unprivileged uid with no capabilities; `None`, it stays root (9p,
    /// which must serve root-owned files; still under its seccomp sandbox).
    pub uid_pool: Option<UidPool>,
    /// File that receives QEMU's own stderr.
    pub hypervisor_log: PathBuf,
    /// Host CPUs QEMU (so every vCPU) may run on; `None`: wherever husk may.
    pub host_cpus: Option<Vec<usize>>,
    /// The VM's NICs, in order (`-netdev tap,id=net<n>`).
    pub nics: Vec<Nic>,
    /// The host network namespace QEMU runs in; `None`: husk's. Its pid is
    /// the one the shim reports, so whatever configures `/proc/PID/ns/net`
    /// (ctr's CNI) configures this one.
    pub netns: Option<Netns>,
    /// Where its RAM comes from.
    pub memory: GuestMemory,
    /// The size of TCG's translation buffer in MiB (`tb-size`); 0: QEMU's
    /// default. Ignored under KVM.
    pub tcg_tb_size_mib: u32,
}

//! The husk agent API: generated ttrpc bindings for `proto/agent.proto` plus the
//! few constants both sides of the channel must agree on. No logic lives here.

/// Generated protobuf messages (`husk.agent.v1`).
#[allow(
    missing_docs,
    dead_code,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    unused_qualifications,
    unused_results,
    unused_mut,
    unused_imports,
    clippy::all
)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

/// Generated ttrpc client and server glue for the `Agent` service.
#[allow(
    missing_docs,
    dead_code,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    unused_qualifications,
    unused_results,
    unused_mut,
    unused_imports,
    clippy::all
)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

/// API major version; see the header of `proto/agent.proto` for the rules.
pub const API_VERSION: u32 = 1;

/// Name of the virtio-serial port the agent serves on
/// (`/sys/class/virtio-ports/*/name` in the guest).
pub const AGENT_PORT_NAME: &str = "husk.agent";

/// Tag of the sandbox's shared filesystem device (virtio-fs or 9p).
pub const SHARE_TAG: &str = "husk-share";

/// Where the agent mounts the sandbox's shared filesystem in the guest.
pub const GUEST_SHARE_DIR: &str = "/run/husk/share";

/// A `linux.namespaces[].path` in a guest spec that names another
/// container of the same sandbox: `<CONTAINER_NS_PREFIX><cid>` means "the
/// namespace of this type of container `cid`'s init". The host writes it
/// for a pod member, whose own spec names the pod's sandbox container by a
/// host path (`/proc/<pid>/ns/net`); the agent joins the namespace of that
/// container's init (`/proc/<its guest pid>/ns/<type>`). A convention of
/// the spec, not a message: older agents see an unknown path and give the
/// container a new namespace, as before.
pub const CONTAINER_NS_PREFIX: &str = "/run/husk/containers/";

/// Largest stdout/stderr chunk one `Read*` call returns, and the largest
/// stdin chunk the host sends in one `WriteStdin` call.
pub const MAX_CHUNK: u32 = 256 * 1024;

/// Kernel command-line key that sets the agent's log filter (`husk.log=debug`).
pub const KERNEL_LOG_PARAM: &str = "husk.log";

/// Kernel command-line key that names the driver of the sandbox's shared
/// filesystem (`husk.share=virtiofs` or `husk.share=9p`): the agent mounts
/// [`SHARE_TAG`] on [`GUEST_SHARE_DIR`] as soon as it serves, while the host
/// prepares the first container, instead of inside that CreateContainer.
pub const KERNEL_SHARE_PARAM: &str = "husk.share";

/// The capabilities the agent can give a container process, by number
/// (`include/uapi/linux/capability.h`). `husk features` reports this set.
pub const CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

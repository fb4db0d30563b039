//! husk-agent: the guest side of husk. As PID 1 of the VM it serves the
//! agent API (`husk-protocol`) on a virtio-serial port and builds containers
//! from OCI specs; as a plain process (`--listen unix:PATH`) it serves the
//! same API on a unix socket, for tests.
//!
//! Layout: `channel` (the virtio-serial listener), `pid1` (early mounts and
//! the never-exiting serve loop), `rpc` (the ttrpc service), `error` (the one
//! mapping to ttrpc codes), `container/` (spec translation, mounts, the init
//! stage, the exec stage), `process/` (reaper, stdio, the clone+exec),
//! `cgroup/` (cgroup v2: resources, stats, OOM events), `caps` and `seccomp`
//! (pure translations of the spec, installed by the stages). `unsafe` lives
//! only in `sys` and `process/spawn`.

pub mod caps;
pub mod cgroup;
pub mod channel;
pub mod container;
pub mod error;
pub mod identity;
pub mod logging;
pub mod net;
pub mod pid1;
pub mod process;
pub mod rpc;
pub mod seccomp;
pub mod server;
pub mod sys;

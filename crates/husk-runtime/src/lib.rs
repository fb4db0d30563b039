//! The host library of husk, shared by the CLI, the containerd shim and the
//! sandbox monitor: configuration, bundles, spec translation, the agent
//! client, and the sandbox lifecycle.

pub mod agent;
pub mod bundle;
pub mod check;
pub mod config;
pub mod console;
pub mod hooks;
pub mod host_cgroup;
pub mod monitor;
pub mod mountns;
pub mod net;
pub mod pod;
pub mod sandbox;
pub mod sandbox_dir;
pub mod share;
pub mod sizing;
pub mod state;
pub mod status;
pub mod stdio;
pub mod template;
pub mod timing;
pub mod translate;

use anyhow::Context;
use husk_hypervisor::qemu::Qemu;
use husk_runtime::config::Config;
use husk_runtime::mountns;
use husk_runtime::run::{run_foreground, RunOptions};

use crate::cli::{GlobalOpts, RunArgs};

pub fn run(global: &GlobalOpts, cfg: &Config, args: RunArgs) -> anyhow::Result<u8> {
    // The sandbox's mounts live in a mount namespace of husk's own; enter it
    // while husk is still single-threaded.
    mountns::enter_private()
        .context("cannot create a private mount namespace (husk needs root)")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let opts = RunOptions {
        id: args.id,
        bundle: args.bundle,
        root: global.root.clone(),
        agent_log: super::agent_log_level(global.debug, cfg),
    };
    let status = rt.block_on(run_foreground(cfg, &Qemu, &opts))?;
    // Blocked stdin reads must not keep the process alive.
    rt.shutdown_background();
    Ok(u8::try_from(status.clamp(0, 255)).unwrap_or(255))
}

use anyhow::Context;
use husk_hypervisor::qemu::Qemu;
use husk_runtime::config::Config;
use husk_runtime::monitor::{self, spawn, MonitorOptions};
use husk_runtime::mountns;

use crate::cli::{GlobalOpts, MonitorArgs};

/// The hidden `monitor` verb: the process `husk create` leaves behind.
pub fn monitor(g: &GlobalOpts, cfg: &Config, a: MonitorArgs) -> anyhow::Result<u8> {
    let ready = a.ready_fd.map(spawn::take_ready_fd).transpose()?;
    let opts = MonitorOptions {
        id: a.id,
        bundle: a.bundle,
        root: g.root.clone(),
        agent_log: super::agent_log_level(g.debug, cfg),
        console_socket: a.console_socket,
        autostart: false,
        ready,
    };
    let code = run_monitor(cfg, opts)?;
    Ok(code)
}

/// Runs a monitor in this process: private mount namespace (while still
/// single-threaded), then the async runtime. Returns the container's status.
pub fn run_monitor(cfg: &Config, opts: MonitorOptions) -> anyhow::Result<u8> {
    mountns::enter_private()
        .context("cannot create a private mount namespace (husk needs root)")?;
    // A spec that asks for a new network namespace without naming one: this
    // process (the pid husk reports) gets one of its own, so a hook that
    // configures /proc/PID/ns/net never touches the host's.
    if let Ok(b) = husk_runtime::bundle::Bundle::load(&opts.bundle) {
        if husk_runtime::net::wants_new_netns(&b.spec) {
            husk_runtime::net::enter_own_netns()
                .context("cannot create the container's host network namespace")?;
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let r = rt.block_on(monitor::serve(cfg, &Qemu, opts));
    // Blocked stdin reads must not keep the process alive.
    rt.shutdown_background();
    let status = match r {
        Ok(s) => s,
        // `husk create` got the error through the ready pipe and reports it.
        Err(monitor::MonitorError::ReportedToCreator) => return Ok(1),
        Err(e) => return Err(e.into()),
    };
    Ok(u8::try_from(status.clamp(0, 255)).unwrap_or(255))
}

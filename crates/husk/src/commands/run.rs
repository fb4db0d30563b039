use husk_runtime::config::Config;
use husk_runtime::monitor::api::Request;
use husk_runtime::monitor::MonitorOptions;

use crate::cli::{GlobalOpts, RunArgs};

pub fn run(g: &GlobalOpts, cfg: &Config, a: RunArgs) -> anyhow::Result<u8> {
    if a.detach {
        super::create::create_container(g, cfg, &a.create)?;
        let t = super::Target::open(g, &a.create.id)?;
        t.ask(&Request::Start)?;
        return Ok(0);
    }
    // In the foreground this process is the container's monitor.
    if let Some(p) = &a.create.pid_file {
        super::write_pid_file(p, std::process::id())?;
    }
    let opts = MonitorOptions {
        id: a.create.id,
        bundle: a.create.bundle,
        root: g.root.clone(),
        agent_log: super::agent_log_level(g.debug, cfg),
        console_socket: a.create.console_socket,
        autostart: true,
        ready: None,
    };
    super::monitor::run_monitor(cfg, opts)
}

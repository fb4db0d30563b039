//! One module per verb, each a few lines over `husk-runtime`.

mod check;
mod run;

use husk_runtime::config::Config;

use crate::cli::{Cli, Command};

/// Runs the verb; returns husk's exit code.
pub fn dispatch(cli: Cli) -> anyhow::Result<u8> {
    let (cfg, _) = Config::load(cli.global.config.as_deref())?;
    match cli.command {
        Command::Run(args) => run::run(&cli.global, &cfg, args),
        Command::Check => check::check(&cfg),
    }
}

/// The agent's log filter: `debug` with `--debug`, else the config's.
pub fn agent_log_level(debug: bool, cfg: &Config) -> String {
    if debug {
        "debug".into()
    } else {
        cfg.log_level.clone()
    }
}

//! One module per verb, each a few lines over `husk-runtime`.

mod check;
mod create;
mod delete;
mod events;
mod exec;
mod features;
mod kill;
mod list;
mod monitor;
mod pause;
mod ps;
mod run;
mod spec;
mod start;
mod state;
mod template;
mod update;

use std::path::{Path, PathBuf};

use anyhow::Context;
use husk_runtime::config::Config;
use husk_runtime::monitor::api::{Request, Response};
use husk_runtime::monitor::client::{ClientError, MonitorClient};
use husk_runtime::sandbox_dir::validate_id;
use husk_runtime::state::{ContainerLock, ContainerState, Status};
use husk_runtime::status::Verb;

use crate::cli::{Cli, Command, GlobalOpts};

/// Runs the verb; returns husk's exit code.
pub fn dispatch(cli: Cli) -> anyhow::Result<u8> {
    let g = &cli.global;
    match cli.command {
        Command::Features => features::features(),
        Command::Spec(a) => spec::spec(a),
        Command::List(a) => list::list(g, a),
        Command::State(a) => state::state(g, &a.id),
        Command::Start(a) => start::start(g, &a.id),
        Command::Kill(a) => kill::kill(g, a),
        Command::Delete(a) => delete::delete(g, a),
        Command::Pause(a) => pause::pause(g, &a.id, true),
        Command::Resume(a) => pause::pause(g, &a.id, false),
        Command::Ps(a) => ps::ps(g, a),
        Command::Events(a) => events::events(g, a),
        Command::Update(a) => update::update(g, a),
        Command::Exec(a) => exec::exec(g, a),
        Command::Check => check::check(&load_config(g)?),
        Command::Template(t) => template::template(g, &load_config(g)?, t),
        Command::Create(a) => create::create(g, &load_config(g)?, a),
        Command::Run(a) => run::run(g, &load_config(g)?, a),
        Command::Monitor(a) => monitor::monitor(g, &load_config(g)?, a),
    }
}

fn load_config(g: &GlobalOpts) -> anyhow::Result<Config> {
    Ok(Config::load(g.config.as_deref())?.0)
}

/// The agent's log filter: `debug` with `--debug`, else the config's.
pub fn agent_log_level(debug: bool, cfg: &Config) -> String {
    if debug {
        "debug".into()
    } else {
        cfg.log_level.clone()
    }
}

/// `<root>/<id>`, after checking the id.
pub fn container_dir(g: &GlobalOpts, id: &str) -> anyhow::Result<PathBuf> {
    validate_id(id)?;
    Ok(g.root.join(id))
}

/// A container's dir, lock and state, for a verb that acts on it.
pub struct Target {
    pub dir: PathBuf,
    pub state: ContainerState,
    _lock: ContainerLock,
}

impl Target {
    pub fn open(g: &GlobalOpts, id: &str) -> anyhow::Result<Target> {
        let dir = container_dir(g, id)?;
        let lock = ContainerLock::acquire(&dir, id)?;
        let state = ContainerState::load(&dir, id)?;
        Ok(Target {
            dir,
            state,
            _lock: lock,
        })
    }

    pub fn status(&self) -> Status {
        self.state.effective_status()
    }

    /// Sends one request to the container's monitor.
    pub fn ask(&self, req: &Request) -> anyhow::Result<Response> {
        match self.call(req) {
            // The container exited after this verb read its state: say so.
            Err(ClientError::Unreachable { .. }) if self.stopped_since() => {
                anyhow::bail!("container {} is stopped", self.state.id)
            }
            r => Ok(r?),
        }
    }

    /// Sends one request to the container's monitor.
    pub fn call(&self, req: &Request) -> Result<Response, ClientError> {
        MonitorClient::connect(&self.dir, &self.state.id)?.call(req, &[])
    }

    /// Whether the monitor has exited, or recorded the container as stopped
    /// (it closes its socket after that), since the state was read.
    pub fn stopped_since(&self) -> bool {
        !self.state.monitor_alive()
            || ContainerState::load(&self.dir, &self.state.id)
                .is_ok_and(|s| s.status == Status::Stopped)
    }

    /// Fails unless the container's status allows `verb` (the lifecycle's
    /// one state machine, [`Status::allows`]).
    pub fn require(&self, verb: Verb) -> anyhow::Result<()> {
        let s = self.status();
        if s.allows(verb) {
            Ok(())
        } else {
            anyhow::bail!("{}", s.refusal(verb, &self.state.id))
        }
    }
}

/// Writes `pid` to `path` atomically (runc's --pid-file), following no
/// symlink: the temporary file is created exclusively with `O_NOFOLLOW`, and
/// `rename` replaces `path` itself (a symlink there is replaced, not
/// followed).
pub fn write_pid_file(path: &Path, pid: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("husk-tmp");
    let open = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
    };
    let mut f = match open() {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            // A stale temporary (or a planted name): unlink never follows.
            std::fs::remove_file(&tmp)
                .with_context(|| format!("cannot remove stale {}", tmp.display()))?;
            open()
        }
        r => r,
    }
    .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(pid.to_string().as_bytes())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// Parses a signal name (`TERM`, `SIGTERM`, `term`) or number.
pub fn parse_signal(s: &str) -> anyhow::Result<i32> {
    if let Ok(n) = s.parse::<i32>() {
        if (1..=64).contains(&n) {
            return Ok(n);
        }
        anyhow::bail!("invalid signal number {n}: use 1-64 or a name such as TERM");
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse::<nix::sys::signal::Signal>()
        .map(|sig| sig as i32)
        .map_err(|_| {
            anyhow::anyhow!("unknown signal {s:?}: use a name such as TERM or KILL, or a number")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_by_name_and_number() {
        assert_eq!(parse_signal("TERM").unwrap(), 15);
        assert_eq!(parse_signal("SIGKILL").unwrap(), 9);
        assert_eq!(parse_signal("hup").unwrap(), 1);
        assert_eq!(parse_signal("9").unwrap(), 9);
        assert!(parse_signal("0").is_err());
        assert!(parse_signal("NOPE")
            .unwrap_err()
            .to_string()
            .contains("NOPE"));
    }

    #[test]
    fn pid_file_follows_no_symlink() {
        let d = std::env::temp_dir().join(format!("husk-pid-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let victim = d.join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let pid = d.join("pid");
        // Planted at the temporary name and at the pid file itself.
        std::os::unix::fs::symlink(&victim, d.join("pid.husk-tmp")).unwrap();
        write_pid_file(&pid, 42).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(std::fs::read_to_string(&pid).unwrap(), "42");
        std::fs::remove_file(&pid).unwrap();
        std::os::unix::fs::symlink(&victim, &pid).unwrap();
        write_pid_file(&pid, 43).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert!(!std::fs::symlink_metadata(&pid)
            .unwrap()
            .file_type()
            .is_symlink());
        std::fs::remove_dir_all(&d).unwrap();
    }
}

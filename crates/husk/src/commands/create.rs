use std::ffi::OsString;

use anyhow::Context;
use husk_runtime::bundle::Bundle;
use husk_runtime::config::Config;
use husk_runtime::monitor::spawn::spawn_monitor;

use crate::cli::{CreateArgs, GlobalOpts, LogFormat};

/// Starts the sandbox monitor, which boots the VM and creates the container;
/// returns its pid once the container is created.
pub fn create_container(g: &GlobalOpts, _cfg: &Config, a: &CreateArgs) -> anyhow::Result<u32> {
    let dir = super::container_dir(g, &a.id)?;
    Bundle::load(&a.bundle)?;
    if dir.exists() {
        anyhow::bail!(
            "container {} already exists ({}): pick another id or `husk delete` it",
            a.id,
            dir.display()
        );
    }
    if a.preserve_fds > 0 {
        tracing::warn!(
            count = a.preserve_fds,
            "--preserve-fds: host descriptors cannot be passed into the VM"
        );
    }
    let exe = std::env::current_exe().context("cannot find the husk binary")?;
    let mut args: Vec<OsString> = vec!["--root".into(), g.root.clone().into()];
    if let Some(c) = &g.config {
        args.extend(["--config".into(), c.clone().into()]);
    }
    if let Some(l) = &g.log {
        args.extend(["--log".into(), l.clone().into()]);
    }
    if g.log_format == LogFormat::Json {
        args.extend(["--log-format".into(), "json".into()]);
    }
    if g.debug {
        args.push("--debug".into());
    }
    args.extend(["monitor".into(), "--bundle".into(), a.bundle.clone().into()]);
    if let Some(s) = &a.console_socket {
        args.extend(["--console-socket".into(), s.clone().into()]);
    }
    args.push(a.id.clone().into());
    // Without a console socket the container's stdio is the caller's, held
    // by the monitor; with one, the monitor keeps none of it.
    let pid = spawn_monitor(&exe, args, a.console_socket.is_none())?;
    if let Some(p) = &a.pid_file {
        super::write_pid_file(p, pid)?;
    }
    Ok(pid)
}

pub fn create(g: &GlobalOpts, cfg: &Config, a: CreateArgs) -> anyhow::Result<u8> {
    create_container(g, cfg, &a)?;
    Ok(0)
}

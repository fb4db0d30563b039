//! `husk-agent`: PID 1 of the guest, or `--listen unix:PATH` for testing the
//! agent as a plain process, or `init` / `exec` (internal: a container's
//! first stage, and the stage that starts an extra process in one).

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use husk_agent::container::ContainerOptions;
use husk_agent::rpc::ShutdownAction;
use husk_agent::{logging, pid1, server};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Notify;

const USAGE: &str = "\
usage: husk-agent                      (as PID 1 of the guest: serve on the virtio-serial port)
       husk-agent --listen unix:PATH [--cgroup-root DIR]
                                       (as a plain process: serve on a unix socket;
                                        containers' cgroups under DIR, a cgroup2 directory)
       husk-agent --version";

fn main() {
    let args: Vec<OsString> = std::env::args_os().collect();
    // The container init stage is PID 1 of its own PID namespace too, so it
    // must be recognised before the PID 1 check.
    if args.len() == 2 && args[1] == "init" {
        husk_agent::container::init::main();
    }
    if args.len() == 2 && args[1] == "exec" {
        husk_agent::container::exec_stage::main();
    }
    if nix::unistd::getpid().as_raw() == 1 {
        pid1::run();
    }
    if let Err(e) = run(&args[1..]) {
        eprintln!("husk-agent: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: &[OsString]) -> Result<()> {
    let args: Vec<&str> = args
        .iter()
        .map(|a| a.to_str().context("arguments must be UTF-8"))
        .collect::<Result<_>>()?;
    match args.as_slice() {
        ["--version"] | ["-V"] => {
            println!(
                "husk-agent {} (agent API {})",
                env!("CARGO_PKG_VERSION"),
                husk_protocol::API_VERSION
            );
            Ok(())
        }
        ["--help"] | ["-h"] => {
            println!("{USAGE}");
            Ok(())
        }
        ["--listen", address] => listen(&socket_path(address)?, None),
        ["--listen", address, "--cgroup-root", root]
        | ["--cgroup-root", root, "--listen", address] => {
            listen(&socket_path(address)?, Some(PathBuf::from(root)))
        }
        _ => bail!("unexpected arguments {args:?}\n{USAGE}"),
    }
}

fn socket_path(address: &str) -> Result<PathBuf> {
    let path = address
        .strip_prefix("unix://")
        .or_else(|| address.strip_prefix("unix:"))
        .with_context(|| {
            format!("listen address {address:?} must look like unix:/path/to/agent.sock")
        })?;
    if path.is_empty() {
        bail!("listen address {address:?} has no path; use unix:/path/to/agent.sock");
    }
    Ok(PathBuf::from(path))
}

/// The agent as a plain process on a unix socket. Containers are killed when
/// the agent exits (Shutdown, SIGTERM, SIGINT) or dies.
fn listen(path: &PathBuf, cgroup_root: Option<PathBuf>) -> Result<()> {
    let filter = std::env::var("HUSK_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| logging::DEFAULT_FILTER.to_string());
    logging::init(&filter);
    // Orphans of the containers are reparented to us, not to the host's init.
    nix::sys::prctl::set_child_subreaper(true).context("becoming a child subreaper")?;
    let runtime = server::runtime().context("starting the async runtime")?;
    runtime.block_on(async {
        // Handlers first: once the socket exists, SIGTERM means a clean exit.
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                std::fs::remove_file(path).ok();
            }
        }
        let socket = tokio::net::UnixListener::bind(path)
            .with_context(|| format!("binding {}", path.display()))?;
        let exit = Arc::new(Notify::new());
        let options = ContainerOptions {
            die_with_agent: true,
            cgroup_root,
            ..ContainerOptions::default()
        };
        let agent = server::start(socket.into(), options, ShutdownAction::Exit(Arc::clone(&exit)))
            .await
            .context("starting the agent")?;
        tracing::info!(socket = %path.display(), version = env!("CARGO_PKG_VERSION"), "husk-agent listening");
        let why = tokio::select! {
            _ = exit.notified() => "Shutdown was called",
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!("exiting ({why}): killing the containers");
        agent.containers.kill_all().await;
        drop(agent);
        std::fs::remove_file(path).ok();
        Ok(())
    })
}

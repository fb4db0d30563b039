//! The sandbox monitor: the long-lived process behind a container. It owns
//! the VM (through [`Sandbox`]), the agent connection, the container's stdio
//! relays, its state file and its API socket; the CLI verbs are thin clients
//! of it ([`api`], [`client`]).
//!
//! Its pid is the container's pid for the caller (`--pid-file`, `state`): it
//! lives exactly as long as the container's init, exits with its status, and
//! forwards the signals it receives to it. `husk create` starts it as a
//! separate process ([`spawn`]); `husk run` in the foreground runs it in
//! place.

pub mod api;
pub mod client;
mod handlers;
pub mod spawn;

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use husk_hypervisor::{Hypervisor, SystemProbe};
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};

use crate::agent::ExitStatus;
use crate::bundle::{Bundle, BundleError};
use crate::config::Config;
use crate::console::{self, ConsoleError};
use crate::hooks::HookError;
use crate::sandbox::{HostPid, Sandbox, SandboxError, Stdio};
use crate::sandbox_dir::{validate_id, SandboxDir, SandboxDirError};
use crate::sizing::SizingError;
use crate::state::{ContainerLock, StateError};

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Dir(#[from] SandboxDirError),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Console(#[from] ConsoleError),
    #[error(transparent)]
    Hook(#[from] HookError),
    #[error(transparent)]
    Sizing(#[from] SizingError),
    #[error("process.terminal is true but no --console-socket was given: pass one, or set terminal to false")]
    NeedConsoleSocket,
    #[error("cannot listen on {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the sandbox monitor")]
    Spawn(#[source] std::io::Error),
    #[error("{0}")]
    Failed(String),
    /// The error went to `husk create` through the ready pipe; it reports
    /// it (printing it here too would show it twice on the same stderr).
    #[error("the sandbox monitor failed before the container was created")]
    ReportedToCreator,
}

pub struct MonitorOptions {
    pub id: String,
    pub bundle: PathBuf,
    pub root: PathBuf,
    /// The agent's log filter.
    pub agent_log: String,
    pub console_socket: Option<PathBuf>,
    /// Start the container at once (`husk run`) instead of waiting for `start`.
    pub autostart: bool,
    /// Where to report "created" or the error (`husk create` reads it).
    pub ready: Option<OwnedFd>,
}

/// Signals the monitor passes on to the container's init.
const FORWARDED: &[i32] = &[
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// What the caller's side of the container's stdio needs kept until the end.
struct HostStdio {
    /// The terminal whose size the container follows, if any.
    tty: Option<OwnedFd>,
    /// Our own terminal's settings, restored on exit.
    restore: Option<(OwnedFd, nix::sys::termios::Termios)>,
}

fn report_ready(ready: &mut Option<OwnedFd>, msg: serde_json::Value) {
    if let Some(fd) = ready.take() {
        let mut f = File::from(fd);
        let _ = f.write_all(msg.to_string().as_bytes());
    }
}

/// Runs the monitor until the container is gone; returns its exit status.
pub async fn serve(
    cfg: &Config,
    hv: &dyn Hypervisor,
    mut opts: MonitorOptions,
) -> Result<i32, MonitorError> {
    let r = serve_inner(cfg, hv, &mut opts).await;
    if let Err(e) = &r {
        if opts.ready.is_some() {
            let msg = error_chain(e);
            tracing::debug!("failed before the container was created: {msg}");
            report_ready(&mut opts.ready, serde_json::json!({ "error": msg }));
            return Err(MonitorError::ReportedToCreator);
        }
    }
    r
}

/// Answers monitor API requests for `sandbox` on `listener` until the
/// listener fails: the CLI's front end of the lifecycle on its own, without
/// booting or owning anything (what tests of the front ends drive).
pub async fn serve_api(listener: UnixListener, sandbox: Arc<Sandbox>) {
    handlers::accept_loop(listener, sandbox, handlers::InFlight::default()).await
}

/// `e` and its sources, joined by ": ".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn io_err(what: &str) -> impl Fn(std::io::Error) -> MonitorError + '_ {
    move |e| MonitorError::Failed(format!("{what}: {e}"))
}

/// The container's stdio on the caller's side: the pty behind
/// `--console-socket`, or the monitor's own stdio (made raw if a terminal).
fn host_stdio(
    terminal: bool,
    console_socket: Option<&PathBuf>,
) -> Result<(Stdio, HostStdio), MonitorError> {
    let mut host = HostStdio {
        tty: None,
        restore: None,
    };
    let own =
        |fd: std::os::fd::BorrowedFd<'_>, what: &str| fd.try_clone_to_owned().map_err(io_err(what));
    if !terminal {
        let stdin = own(std::io::stdin().as_fd(), "stdin")?;
        return Ok((
            Stdio {
                stdin: Some(Box::new(File::from(stdin))),
                stdout: Box::new(tokio::io::stdout()),
                stderr: Box::new(tokio::io::stderr()),
                terminal: false,
            },
            host,
        ));
    }
    let (reader, writer): (File, File) = match console_socket {
        Some(sock) => {
            let pty = console::send_pty_to_console_socket(sock)?;
            // As a session leader without a terminal, opening the slave
            // makes it ours: its size changes then arrive as SIGWINCH.
            let ctty = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&pty.name)
                .ok();
            let w = File::from(pty.slave);
            let r = w.try_clone().map_err(io_err("pty"))?;
            host.tty = Some(match ctty {
                Some(c) => c.into(),
                None => r.try_clone().map_err(io_err("pty"))?.into(),
            });
            (r, w)
        }
        None => {
            let stdin = own(std::io::stdin().as_fd(), "stdin")?;
            if console::is_terminal(stdin.as_fd()) {
                if let Ok(saved) = console::make_raw(stdin.as_fd()) {
                    host.restore = Some((stdin.try_clone().map_err(io_err("stdin"))?, saved));
                }
                host.tty = Some(stdin.try_clone().map_err(io_err("stdin"))?);
            }
            let stdout = own(std::io::stdout().as_fd(), "stdout")?;
            (File::from(stdin), File::from(stdout))
        }
    };
    let w2 = writer.try_clone().map_err(io_err("pty"))?;
    Ok((
        Stdio {
            stdin: Some(Box::new(reader)),
            stdout: Box::new(tokio::fs::File::from_std(writer)),
            stderr: Box::new(tokio::fs::File::from_std(w2)),
            terminal: true,
        },
        host,
    ))
}

async fn serve_inner(
    cfg: &Config,
    hv: &dyn Hypervisor,
    opts: &mut MonitorOptions,
) -> Result<i32, MonitorError> {
    validate_id(&opts.id)?;
    let bundle = Bundle::load(&opts.bundle)?;
    let terminal = bundle
        .spec
        .process()
        .as_ref()
        .and_then(|p| p.terminal())
        .unwrap_or(false);
    if terminal && opts.console_socket.is_none() && !opts.autostart {
        return Err(MonitorError::NeedConsoleSocket);
    }
    let dir = SandboxDir::create(&opts.root, &opts.id)?;
    let lock = ContainerLock::acquire(dir.path(), &opts.id)?;
    let sock = dir.monitor_socket();
    let id = opts.id.clone();
    let sandbox = Sandbox::launch(
        cfg,
        hv,
        &SystemProbe,
        dir,
        &id,
        &bundle,
        &opts.agent_log,
        HostPid::Owner,
        // The CLI is not the CRI path: only the spec's limits size the VM.
        crate::sizing::Annotations::Ignored,
    )
    .await?;
    let prepared = async {
        let (stdio, host) = host_stdio(terminal, opts.console_socket.as_ref())?;
        sandbox.create(&id, &bundle, stdio).await?;
        if let Some((rows, cols)) = host
            .tty
            .as_ref()
            .and_then(|t| console::window_size(t.as_fd()))
        {
            let _ = sandbox.resize(&id, "", rows.into(), cols.into()).await;
        }
        // Through the directory's descriptor: the path may be longer than
        // `sun_path` (Docker's root and ids).
        let listener = husk_sys::socket_path::bind_unix(&sock)
            .and_then(|l| {
                l.set_nonblocking(true)?;
                UnixListener::from_std(l)
            })
            .map_err(|source| MonitorError::Listen {
                path: sock.clone(),
                source,
            })?;
        // 0600 whatever the umask (the dir is 0700 too).
        crate::sandbox_dir::restrict(&sock, 0o600).map_err(|source| MonitorError::Listen {
            path: sock.clone(),
            source,
        })?;
        Ok::<_, MonitorError>((host, listener))
    }
    .await;
    let (host, listener) = match prepared {
        Ok(p) => p,
        Err(e) => {
            sandbox.teardown(false).await;
            return Err(e);
        }
    };
    report_ready(
        &mut opts.ready,
        serde_json::json!({ "pid": std::process::id() }),
    );
    drop(lock);
    if opts.autostart {
        if let Err(e) = sandbox.start(&id).await {
            sandbox.teardown(false).await;
            return Err(e.into());
        }
    }
    let in_flight = handlers::InFlight::default();
    let accept = tokio::spawn(handlers::accept_loop(
        listener,
        sandbox.clone(),
        in_flight.clone(),
    ));
    let ended = main_loop(&sandbox, &id, host.tty.as_ref()).await;
    accept.abort();
    if let Some((fd, saved)) = &host.restore {
        console::restore(fd.as_fd(), saved);
    }
    let result = match ended {
        // Deleted through the API: the handler tore it all down.
        None => Ok(128 + libc::SIGKILL),
        Some(exit) => {
            // A lost agent is usually a VM that died: give its exit a moment
            // to be seen, so the cause is named.
            let mut vm_exit = sandbox.vm_exit();
            if exit == ExitStatus::LOST {
                let _ =
                    tokio::time::timeout(Duration::from_secs(2), vm_exit.wait_for(Option::is_some))
                        .await;
            }
            let died = vm_exit.borrow().clone();
            let console = sandbox.console_tail();
            if opts.autostart {
                // A foreground `husk run` leaves nothing, as runc.
                let _ = sandbox.delete(&id, true).await;
            } else {
                // A created container that ended stays until `husk delete`.
                sandbox.drain(&id).await;
                sandbox.teardown(true).await;
            }
            match died {
                Some(vm_exit) if exit == ExitStatus::LOST => {
                    Err(MonitorError::Sandbox(SandboxError::VmDied {
                        exit: vm_exit,
                        when: "while the container was running",
                        console,
                    }))
                }
                _ if exit == ExitStatus::LOST => Err(MonitorError::Failed(
                    "lost the connection to the agent".into(),
                )),
                _ => Ok(exit.status),
            }
        }
    };
    // Let the handlers write their last replies (a delete's, an exec's
    // exit) before the process ends.
    in_flight.drained(REPLY_TIMEOUT).await;
    result
}

/// How long the monitor waits, at its end, for replies still being written.
const REPLY_TIMEOUT: Duration = Duration::from_secs(25);

/// Waits until the container's init ends (its status) or the container is
/// deleted through the API (`None`), forwarding signals meanwhile.
async fn main_loop(sandbox: &Arc<Sandbox>, id: &str, tty: Option<&OwnedFd>) -> Option<ExitStatus> {
    let (sig_tx, mut sig_rx) = tokio::sync::mpsc::unbounded_channel();
    for &s in FORWARDED.iter().chain(&[libc::SIGWINCH]) {
        if let Ok(mut stream) = signal(SignalKind::from_raw(s)) {
            let tx = sig_tx.clone();
            tokio::spawn(async move {
                while stream.recv().await.is_some() {
                    if tx.send(s).is_err() {
                        break;
                    }
                }
            });
        }
    }
    let Ok(mut exit) = sandbox.wait(id, "") else {
        return None;
    };
    let mut deleted = sandbox.deleting();
    loop {
        tokio::select! {
            e = exit.wait_for(Option::is_some) => {
                let status = e.ok().and_then(|e| *e).map(|e| e.status);
                if sandbox.is_deleting() {
                    return None;
                }
                return status;
            }
            _ = deleted.wait_for(|d| *d) => return None,
            Some(sig) = sig_rx.recv() => {
                if sig == libc::SIGWINCH {
                    if let Some((rows, cols)) = tty.and_then(|t| console::window_size(t.as_fd())) {
                        let _ = sandbox.resize(id, "", rows.into(), cols.into()).await;
                    }
                } else {
                    tracing::debug!(signal = sig, "forwarding signal");
                    if let Err(e) = sandbox.kill(id, "", sig, false).await {
                        tracing::debug!(error = %e, "forwarding signal");
                    }
                }
            }
        }
    }
}

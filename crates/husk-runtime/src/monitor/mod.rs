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
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use husk_hypervisor::{Hypervisor, VmExit};
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot};

use crate::agent::{AgentClient, AgentError, ExitStatus};
use crate::bundle::{Bundle, BundleError};
use crate::config::Config;
use crate::console::{self, ConsoleError};
use crate::hooks::{self, HookError};
use crate::sandbox::{Sandbox, SandboxError};
use crate::sandbox_dir::{validate_id, SandboxDir, SandboxDirError};
use crate::sizing::{self, SizingError};
use crate::state::{self, ContainerLock, ContainerState, StateError, Status};
use crate::stdio;
use api::Response;

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

/// How long output may keep arriving after a process exited.
pub(crate) const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Requests that need the VM itself, served by the main loop.
pub(crate) enum Command {
    Pause(oneshot::Sender<Result<(), String>>),
    Resume(oneshot::Sender<Result<(), String>>),
    Delete {
        force: bool,
        reply: oneshot::Sender<Response>,
    },
}

/// What request handlers share with the main loop.
pub(crate) struct Shared {
    pub agent: AgentClient,
    pub hooks: oci_spec::runtime::Hooks,
    pub cid: String,
    pub dir: PathBuf,
    pub state: Mutex<ContainerState>,
    pub commands: mpsc::Sender<Command>,
    pub in_flight: handlers::InFlight,
}

impl Shared {
    pub fn oci_state(&self) -> serde_json::Value {
        self.state.lock().expect("state lock").oci_state()
    }

    /// Runs the poststart hooks (failures are logged, as the spec says).
    pub async fn poststart(&self) {
        let hooks = self.hooks.poststart().clone().unwrap_or_default();
        if !hooks.is_empty() {
            hooks::run_logged("poststart", &hooks, &self.oci_state()).await;
        }
    }

    pub fn status(&self) -> Status {
        self.state.lock().expect("state lock").status
    }

    pub fn set_status(&self, status: Status) {
        let mut s = self.state.lock().expect("state lock");
        s.status = status;
        if let Err(e) = s.save(&self.dir) {
            tracing::error!("{e}");
        }
    }
}

enum Ended {
    Exited(ExitStatus),
    AgentLost(AgentError),
    VmDied(VmExit),
    Deleted(oneshot::Sender<Response>),
}

/// The container's stdio on the host side.
struct Stdio {
    out: tokio::task::JoinHandle<()>,
    err: tokio::task::JoinHandle<()>,
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
    let sized = sizing::vm_config(cfg, &bundle.spec, &sizing::Host::probe())?;
    let cfg = &sized;
    let t0 = Instant::now();
    let dir = SandboxDir::create(&opts.root, &opts.id)?;
    let dir_path = dir.path().to_path_buf();
    let lock = ContainerLock::acquire(&dir_path, &opts.id)?;
    let me = std::process::id() as i32;
    let mut st = ContainerState {
        id: opts.id.clone(),
        bundle: bundle.dir.clone(),
        rootfs: bundle.rootfs.clone(),
        status: Status::Creating,
        pid: me,
        pid_start_time: state::process_start_time(me).unwrap_or(0),
        created: state::now_rfc3339(),
        annotations: bundle
            .spec
            .annotations()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect(),
        owner: String::new(),
        exit_status: None,
        vm_pid: None,
    };
    st.save(&dir_path)?;
    let mut sandbox = Sandbox::start(cfg, hv, dir, &opts.id, &opts.agent_log).await?;
    st.vm_pid = Some(sandbox.vm_pid());

    let prepared = prepare(&mut sandbox, &bundle, opts, terminal).await;
    let (stdio, listener) = match prepared {
        Ok(p) => p,
        Err(e) => {
            sandbox.teardown().await;
            return Err(e);
        }
    };
    let agent = sandbox.agent().clone();
    let (cmd_tx, cmd_rx) = mpsc::channel(8);
    st.status = Status::Created;
    st.save(&dir_path)?;
    let spec_hooks = bundle.spec.hooks().clone().unwrap_or_default();
    if spec_hooks.create_container().is_some() || spec_hooks.start_container().is_some() {
        tracing::warn!("createContainer and startContainer hooks are not run: they belong in the container's namespaces, inside the VM, where host hook binaries do not exist");
    }
    let mut create_hooks = spec_hooks.prestart().clone().unwrap_or_default();
    create_hooks.extend(spec_hooks.create_runtime().clone().unwrap_or_default());
    if !create_hooks.is_empty() {
        if let Err(e) = hooks::run("createRuntime", &create_hooks, &st.oci_state()).await {
            drop(stdio);
            sandbox.teardown().await;
            return Err(e.into());
        }
    }
    let shared = Arc::new(Shared {
        agent: agent.clone(),
        hooks: spec_hooks,
        cid: opts.id.clone(),
        dir: dir_path.clone(),
        state: Mutex::new(st),
        commands: cmd_tx,
        in_flight: handlers::InFlight::default(),
    });
    report_ready(&mut opts.ready, serde_json::json!({ "pid": me }));
    drop(lock);

    if opts.autostart {
        let ts = Instant::now();
        if let Err(e) = sandbox
            .while_alive(
                "while starting the container",
                agent.start_container(&opts.id),
            )
            .await
        {
            sandbox.teardown().await;
            return Err(e.into());
        }
        shared.set_status(Status::Running);
        shared.poststart().await;
        tracing::info!(
            target: "husk_timing",
            start_ms = ts.elapsed().as_secs_f64() * 1e3,
            total_to_running_ms = t0.elapsed().as_secs_f64() * 1e3,
            "container running"
        );
    }
    let Stdio {
        out,
        err,
        tty,
        restore,
    } = stdio;
    let accept = tokio::spawn(handlers::accept_loop(listener, shared.clone()));
    let ended = main_loop(&mut sandbox, &shared, cmd_rx, tty.as_ref()).await;
    // Stopped is recorded before the API socket closes: a verb that finds
    // the socket gone then also finds the container stopped.
    {
        let mut s = shared.state.lock().expect("state lock");
        s.status = Status::Stopped;
        s.exit_status = Some(match &ended {
            Ended::Exited(st) => st.status,
            _ => 255,
        });
        if !matches!(ended, Ended::Deleted(_)) {
            let _ = s.save(&dir_path);
        }
    }
    accept.abort();

    if let Ended::Exited(_) = &ended {
        // The init has exited; its namespace is gone, so the pipes close soon.
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
            let _ = out.await;
            let _ = err.await;
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                "container output did not end {DRAIN_TIMEOUT:?} after its exit; dropping the rest"
            );
        }
    } else {
        out.abort();
        err.abort();
    }
    if let Some((fd, saved)) = &restore {
        console::restore(fd.as_fd(), saved);
    }
    let td = Instant::now();
    let poststop = shared.hooks.poststop().clone().unwrap_or_default();
    let stopped_state = shared.oci_state();
    let result = finish(ended, sandbox, opts.autostart, td).await;
    // poststop hooks run once the container is deleted, before the delete
    // returns: here for a foreground `husk run` (deleted as it ends), by
    // `husk delete` for a created container.
    if opts.autostart && !poststop.is_empty() {
        hooks::run_logged("poststop", &poststop, &stopped_state).await;
    }
    // Let the handlers write their last replies (a delete's, an exec's
    // exit) before the process ends.
    shared.in_flight.drained(REPLY_TIMEOUT).await;
    result
}

/// How long the monitor waits, at its end, for replies still being written.
const REPLY_TIMEOUT: Duration = Duration::from_secs(3);

/// Tears the sandbox down after the container ended; returns its status.
async fn finish(
    ended: Ended,
    mut sandbox: Sandbox,
    autostart: bool,
    td: Instant,
) -> Result<i32, MonitorError> {
    let opts_autostart = autostart;
    match ended {
        Ended::Deleted(reply) => {
            sandbox.teardown().await;
            let _ = reply.send(Response::Ok {
                value: serde_json::Value::Null,
            });
            Ok(137)
        }
        Ended::Exited(s) => {
            // A foreground `husk run` leaves nothing (as runc); a created
            // container stays until `husk delete`.
            if !opts_autostart {
                sandbox.dir_mut().keep_state();
            }
            sandbox.teardown().await;
            tracing::info!(target: "husk_timing", teardown_ms = td.elapsed().as_secs_f64() * 1e3, "sandbox removed");
            Ok(s.status)
        }
        Ended::VmDied(exit) => {
            let err = sandbox.died(exit, "while the container was running");
            if !opts_autostart {
                sandbox.dir_mut().keep_state();
            }
            sandbox.teardown().await;
            Err(err.into())
        }
        Ended::AgentLost(e) => {
            if !opts_autostart {
                sandbox.dir_mut().keep_state();
            }
            sandbox.teardown().await;
            Err(MonitorError::Sandbox(e.into()))
        }
    }
}

/// Creates the container in the sandbox, wires its stdio and binds the API
/// socket.
async fn prepare(
    sandbox: &mut Sandbox,
    bundle: &Bundle,
    opts: &MonitorOptions,
    terminal: bool,
) -> Result<(Stdio, UnixListener), MonitorError> {
    let cid = opts.id.clone();
    let tc = Instant::now();
    sandbox.create_container(&cid, bundle).await?;
    let agent = sandbox.agent().clone();
    let mut restore = None;
    let mut tty = None;
    let (out, err) = if terminal {
        let (reader, writer): (File, File) = match &opts.console_socket {
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
                let r = w
                    .try_clone()
                    .map_err(|e| MonitorError::Failed(format!("pty: {e}")))?;
                tty = Some(
                    ctty.map(OwnedFd::from).unwrap_or(
                        r.try_clone()
                            .map_err(|e| MonitorError::Failed(format!("pty: {e}")))?
                            .into(),
                    ),
                );
                (r, w)
            }
            None => {
                let stdin = std::io::stdin()
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(|e| MonitorError::Failed(format!("stdin: {e}")))?;
                if console::is_terminal(stdin.as_fd()) {
                    if let Ok(saved) = console::make_raw(stdin.as_fd()) {
                        restore = Some((
                            stdin
                                .try_clone()
                                .map_err(|e| MonitorError::Failed(format!("stdin: {e}")))?,
                            saved,
                        ));
                    }
                    tty = Some(
                        stdin
                            .try_clone()
                            .map_err(|e| MonitorError::Failed(format!("stdin: {e}")))?,
                    );
                }
                let stdout = std::io::stdout()
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(|e| MonitorError::Failed(format!("stdout: {e}")))?;
                (File::from(stdin), File::from(stdout))
            }
        };
        if let Some((rows, cols)) = tty.as_ref().and_then(|t| console::window_size(t.as_fd())) {
            let _ = agent.resize_pty(&cid, "", rows.into(), cols.into()).await;
        }
        let w2 = writer
            .try_clone()
            .map_err(|e| MonitorError::Failed(format!("pty: {e}")))?;
        stdio::relay_input(agent.clone(), cid.clone(), String::new(), reader);
        (
            stdio::relay_output(
                agent.clone(),
                cid.clone(),
                String::new(),
                false,
                tokio::fs::File::from_std(writer),
            ),
            stdio::relay_output(
                agent.clone(),
                cid.clone(),
                String::new(),
                true,
                tokio::fs::File::from_std(w2),
            ),
        )
    } else {
        let stdin = std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| MonitorError::Failed(format!("stdin: {e}")))?;
        stdio::relay_input(agent.clone(), cid.clone(), String::new(), File::from(stdin));
        (
            stdio::relay_output(
                agent.clone(),
                cid.clone(),
                String::new(),
                false,
                tokio::io::stdout(),
            ),
            stdio::relay_output(
                agent.clone(),
                cid.clone(),
                String::new(),
                true,
                tokio::io::stderr(),
            ),
        )
    };
    let sock = sandbox.dir().monitor_socket();
    let listener =
        UnixListener::bind(&sock).map_err(|source| MonitorError::Listen { path: sock, source })?;
    tracing::info!(
        target: "husk_timing",
        create_ms = tc.elapsed().as_secs_f64() * 1e3,
        "container created"
    );
    Ok((
        Stdio {
            out,
            err,
            tty,
            restore,
        },
        listener,
    ))
}

async fn main_loop(
    sandbox: &mut Sandbox,
    shared: &Arc<Shared>,
    mut commands: mpsc::Receiver<Command>,
    tty: Option<&OwnedFd>,
) -> Ended {
    let (sig_tx, mut sig_rx) = mpsc::unbounded_channel();
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
    let wait = {
        let agent = shared.agent.clone();
        let cid = shared.cid.clone();
        tokio::spawn(async move { agent.wait_process(&cid, "").await })
    };
    tokio::pin!(wait);
    loop {
        tokio::select! {
            r = &mut wait => {
                return match r {
                    Ok(Ok(s)) => Ended::Exited(s),
                    Ok(Err(e)) => match tokio::time::timeout(Duration::from_secs(2), sandbox.wait_vm()).await {
                        Ok(exit) => Ended::VmDied(exit),
                        Err(_) => Ended::AgentLost(e),
                    },
                    Err(_) => Ended::AgentLost(AgentError::Unavailable("wait task failed".into())),
                };
            }
            exit = sandbox.wait_vm() => return Ended::VmDied(exit),
            Some(cmd) = commands.recv() => match cmd {
                Command::Pause(reply) => {
                    let r = sandbox.pause().await.map_err(|e| error_chain(&e));
                    if r.is_ok() {
                        shared.set_status(Status::Paused);
                    }
                    let _ = reply.send(r);
                }
                Command::Resume(reply) => {
                    let r = sandbox.resume().await.map_err(|e| error_chain(&e));
                    if r.is_ok() {
                        shared.set_status(Status::Running);
                    }
                    let _ = reply.send(r);
                }
                Command::Delete { force, reply } => {
                    let status = shared.status();
                    if !force && matches!(status, Status::Running | Status::Paused) {
                        let _ = reply.send(Response::Error {
                            message: format!("container {} is {status}: stop it first or use --force", shared.cid),
                        });
                    } else {
                        return Ended::Deleted(reply);
                    }
                }
            },
            Some(sig) = sig_rx.recv() => {
                if sig == libc::SIGWINCH {
                    if let Some((rows, cols)) = tty.and_then(|t| console::window_size(t.as_fd())) {
                        let _ = shared.agent.resize_pty(&shared.cid, "", rows.into(), cols.into()).await;
                    }
                } else if shared.status() != Status::Paused {
                    tracing::debug!(signal = sig, "forwarding signal");
                    if let Err(e) = shared.agent.signal_process(&shared.cid, "", sig, false).await {
                        tracing::debug!(error = %e, "forwarding signal");
                    }
                }
            }
        }
    }
}

//! `husk run` in the foreground: one container in a new VM, with the
//! caller's stdio, signals forwarded, and the container's exit status as the
//! result. The process calling this is the sandbox's owner.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use husk_hypervisor::Hypervisor;
use tokio::signal::unix::{signal, SignalKind};

use crate::agent::ExitStatus;
use crate::bundle::{Bundle, BundleError};
use crate::config::Config;
use crate::sandbox::{Sandbox, SandboxError};
use crate::sandbox_dir::validate_id;
use crate::stdio;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Id(#[from] crate::sandbox_dir::SandboxDirError),
}

pub struct RunOptions {
    pub id: String,
    pub bundle: PathBuf,
    pub root: PathBuf,
    /// The agent's log filter.
    pub agent_log: String,
}

/// Signals a foreground `husk run` passes on to the container.
const FORWARDED: &[i32] = &[
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// How long output may keep arriving after the container's init exited.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the bundle's process in a new VM; returns its exit status.
pub async fn run_foreground(
    cfg: &Config,
    hv: &dyn Hypervisor,
    opts: &RunOptions,
) -> Result<i32, RunError> {
    validate_id(&opts.id)?;
    let bundle = Bundle::load(&opts.bundle)?;
    let t0 = Instant::now();
    let mut sandbox = Sandbox::start(cfg, hv, &opts.root, &opts.id, &opts.agent_log).await?;
    let result = run_in(&mut sandbox, &opts.id, &bundle, t0).await;
    let td = Instant::now();
    sandbox.teardown().await;
    tracing::info!(target: "husk_timing", teardown_ms = td.elapsed().as_secs_f64() * 1e3, "sandbox removed");
    Ok(result?.status)
}

async fn run_in(
    sandbox: &mut Sandbox,
    cid: &str,
    bundle: &Bundle,
    t0: Instant,
) -> Result<ExitStatus, SandboxError> {
    let tc = Instant::now();
    sandbox.create_container(cid, bundle).await?;
    let agent = sandbox.agent().clone();
    let out = stdio::relay_output(
        agent.clone(),
        cid.into(),
        String::new(),
        false,
        tokio::io::stdout(),
    );
    let err = stdio::relay_output(
        agent.clone(),
        cid.into(),
        String::new(),
        true,
        tokio::io::stderr(),
    );
    sandbox
        .while_alive("while starting the container", agent.start_container(cid))
        .await?;
    tracing::info!(
        target: "husk_timing",
        create_start_ms = tc.elapsed().as_secs_f64() * 1e3,
        total_to_running_ms = t0.elapsed().as_secs_f64() * 1e3,
        "container running"
    );
    let _stdin = stdio::relay_stdin(agent.clone(), cid.into(), String::new());

    let mut signals = Vec::new();
    for &s in FORWARDED {
        if let Ok(stream) = signal(SignalKind::from_raw(s)) {
            signals.push((s, stream));
        }
    }
    let (sig_tx, mut sig_rx) = tokio::sync::mpsc::unbounded_channel();
    for (num, mut stream) in signals {
        let tx = sig_tx.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                if tx.send(num).is_err() {
                    break;
                }
            }
        });
    }

    let forwarder = {
        let agent = agent.clone();
        let cid = cid.to_string();
        tokio::spawn(async move {
            while let Some(sig) = sig_rx.recv().await {
                tracing::debug!(signal = sig, "forwarding signal");
                if let Err(e) = agent.signal_process(&cid, "", sig).await {
                    tracing::debug!(error = %e, "forwarding signal");
                }
            }
        })
    };
    let status = sandbox
        .while_alive(
            "while the container was running",
            agent.wait_process(cid, ""),
        )
        .await;
    forwarder.abort();
    let status = status?;
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
    Ok(status)
}

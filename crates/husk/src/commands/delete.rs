use std::time::{Duration, Instant};

use husk_runtime::bundle::Bundle;
use husk_runtime::hooks;
use husk_runtime::monitor::api::Request;
use husk_runtime::monitor::client::ClientError;
use husk_runtime::sandbox_dir::remove_leftovers;
use husk_runtime::state::{ContainerState, StateError, Status};

use crate::cli::{DeleteArgs, GlobalOpts};

pub fn delete(g: &GlobalOpts, a: DeleteArgs) -> anyhow::Result<u8> {
    let dir = super::container_dir(g, &a.id)?;
    let t = match super::Target::open(g, &a.id) {
        Ok(t) => t,
        // As runc: --force on a container that is not (fully) there is fine.
        Err(e) if a.force => {
            if matches!(
                e.downcast_ref::<StateError>(),
                Some(StateError::NotFound(_))
            ) {
                if dir.exists() {
                    remove_leftovers(&dir);
                }
                return Ok(0);
            }
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    let status = t.status();
    if !a.force && matches!(status, Status::Running | Status::Paused) {
        anyhow::bail!(
            "cannot delete container {}: it is {status}; stop it first or use --force",
            a.id
        );
    }
    if t.state.monitor_alive() {
        // A recorded `stopped` means the container has exited and its
        // monitor is tearing the sandbox down (it no longer answers): let
        // it finish. Otherwise the monitor stops the container and tears
        // down; a monitor that went away meanwhile leaves the same state.
        if t.state.status != Status::Stopped {
            match t.call(&Request::Delete { force: true }) {
                Ok(_) => {}
                Err(ClientError::Unreachable { .. }) if t.stopped_since() => {}
                Err(e) => return Err(e.into()),
            }
        }
        wait_gone(&t.state);
    }
    kill_stray_vm(&t.state, &dir);
    if dir.exists() {
        remove_leftovers(&dir);
    }
    run_poststop(&t.state);
    Ok(0)
}

/// Runs the bundle's poststop hooks, as the runtime spec says: after the
/// container is deleted, before `delete` returns. Failures are logged.
fn run_poststop(s: &ContainerState) {
    let hooks = match Bundle::load(&s.bundle) {
        Ok(b) => b
            .spec
            .hooks()
            .as_ref()
            .and_then(|h| h.poststop().clone())
            .unwrap_or_default(),
        Err(e) => {
            tracing::debug!("no poststop hooks run: {e}");
            return;
        }
    };
    if hooks.is_empty() {
        return;
    }
    let mut stopped = s.clone();
    stopped.status = Status::Stopped;
    let state = stopped.oci_state();
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(hooks::run_logged("poststop", &hooks, &state)),
        Err(e) => tracing::warn!("cannot run the poststop hooks: {e}"),
    }
}

/// How long a monitor may take to tear its sandbox down and exit (QEMU
/// gets a 3 s grace period to quit).
const MONITOR_EXIT_TIMEOUT: Duration = Duration::from_secs(20);

/// Waits (briefly) for the monitor to exit after it tore the sandbox down.
fn wait_gone(s: &ContainerState) {
    let start = Instant::now();
    while s.monitor_alive() && start.elapsed() < MONITOR_EXIT_TIMEOUT {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A QEMU outlives its monitor only if something went badly wrong (it dies
/// with its parent); make sure, checking it is really this sandbox's.
fn kill_stray_vm(s: &ContainerState, dir: &std::path::Path) {
    let Some(pid) = s.vm_pid else { return };
    let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return;
    };
    if String::from_utf8_lossy(&cmd).contains(&*dir.to_string_lossy()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

use std::time::{Duration, Instant};

use husk_runtime::hooks;
use husk_runtime::monitor::api::Request;
use husk_runtime::monitor::client::ClientError;
use husk_runtime::pod::kill_if_mentions;
use husk_runtime::sandbox_dir::remove_leftovers;
use husk_runtime::state::{ContainerState, StateError, Status};
use husk_runtime::status::Verb;

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
    t.require(if a.force {
        Verb::ForceDelete
    } else {
        Verb::Delete
    })?;
    // The monitor runs the poststop hooks when it deletes the container;
    // otherwise (it is gone, or the container ended on its own) they run here.
    let mut poststop_done = false;
    if t.state.monitor_alive() {
        // A recorded `stopped` means the container has exited and its
        // monitor is tearing the sandbox down (it no longer answers): let
        // it finish. Otherwise the monitor stops the container and tears
        // down; a monitor that went away meanwhile leaves the same state.
        if t.state.status != Status::Stopped {
            match t.call(&Request::Delete { force: true }) {
                Ok(_) => poststop_done = true,
                Err(ClientError::Unreachable { .. }) if t.stopped_since() => {}
                // A monitor that fails the request is on its way out (its
                // VM died: QEMU or virtiofsd killed) or wedged: --force
                // gives it a moment, then ends it (its QEMU and mounts go
                // with it), so a dead VM cannot pin the container.
                // (Or it answered with its VM's death while tearing down.)
                Err(e) if a.force => {
                    tracing::debug!("{e}; waiting for the monitor to exit");
                    if !wait_gone_for(&t.state, UNREACHABLE_GRACE) {
                        tracing::warn!(
                            pid = t.state.pid,
                            "the monitor does not answer; killing it"
                        );
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(t.state.pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        wait_gone(&t.state);
    }
    // A QEMU outlives its monitor only if something went badly wrong (it
    // dies with its parent); make sure, checking it is really this sandbox's.
    if let Some(pid) = t.state.vm_pid {
        kill_if_mentions(pid as i32, &dir);
    }
    if dir.exists() {
        remove_leftovers(&dir);
    }
    if !poststop_done {
        run_poststop(&t.state);
    }
    Ok(0)
}

/// Runs the poststop hooks recorded at create (not what `config.json`
/// says by now), as the runtime spec says: after the container is deleted,
/// before `delete` returns. Failures are logged.
fn run_poststop(s: &ContainerState) {
    if s.poststop.is_empty() {
        return;
    }
    let mut stopped = s.clone();
    stopped.status = Status::Stopped;
    let state = stopped.oci_state();
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(hooks::run_logged("poststop", &s.poststop, &state)),
        Err(e) => tracing::warn!("cannot run the poststop hooks: {e}"),
    }
}

/// How long a monitor may take to tear its sandbox down and exit (QEMU
/// gets a 3 s grace period to quit).
const MONITOR_EXIT_TIMEOUT: Duration = Duration::from_secs(20);

/// How long `delete --force` waits for a monitor that stopped answering
/// before it kills it.
const UNREACHABLE_GRACE: Duration = Duration::from_secs(5);

/// Waits (briefly) for the monitor to exit after it tore the sandbox down.
fn wait_gone(s: &ContainerState) {
    wait_gone_for(s, MONITOR_EXIT_TIMEOUT);
}

/// Waits up to `timeout` for the monitor to exit; whether it did.
fn wait_gone_for(s: &ContainerState, timeout: Duration) -> bool {
    let start = Instant::now();
    while s.monitor_alive() && start.elapsed() < timeout {
        std::thread::sleep(Duration::from_millis(5));
    }
    !s.monitor_alive()
}

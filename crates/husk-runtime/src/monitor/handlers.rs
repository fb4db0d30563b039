//! The monitor's API socket: one task per connection, one request each.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{oneshot, Notify};

use super::api::{self, ExecStdio, Request, Response};
use super::{error_chain, Command, Shared, DRAIN_TIMEOUT};
use crate::console;
use crate::state::Status;
use crate::stdio;

/// Counts the requests being handled, so the monitor can let them write
/// their replies before it exits (a `delete` is answered only after the
/// teardown, right before the monitor's end).
#[derive(Clone, Default)]
pub(crate) struct InFlight(Arc<(AtomicUsize, Notify)>);

/// One request being handled; dropping it ends it.
pub(crate) struct InFlightGuard(InFlight);

impl InFlight {
    pub fn enter(&self) -> InFlightGuard {
        self.0 .0.fetch_add(1, Ordering::SeqCst);
        InFlightGuard(self.clone())
    }

    /// Waits until no request is being handled, or `timeout` passes.
    pub async fn drained(&self, timeout: Duration) {
        let wait = async {
            loop {
                let notified = self.0 .1.notified();
                if self.0 .0.load(Ordering::SeqCst) == 0 {
                    return;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(timeout, wait).await.is_err() {
            tracing::debug!("requests still in flight as the monitor exits");
        }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0 .0 .0.fetch_sub(1, Ordering::SeqCst);
        self.0 .0 .1.notify_waiters();
    }
}

pub(crate) async fn accept_loop(listener: UnixListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let guard = shared.in_flight.enter();
                let shared = shared.clone();
                tokio::spawn(async move {
                    handle(stream, shared).await;
                    drop(guard);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "monitor socket accept failed");
                return;
            }
        }
    }
}

fn err(message: impl Into<String>) -> Response {
    Response::Error {
        message: message.into(),
    }
}

fn ok(value: Value) -> Response {
    Response::Ok { value }
}

async fn handle(mut stream: UnixStream, shared: Arc<Shared>) {
    let (req, fds) = match api::read_request(&mut stream).await {
        Ok(r) => r,
        Err(e) => {
            let _ = api::write_response(&mut stream, &err(error_chain(&e))).await;
            return;
        }
    };
    tracing::debug!(?req, "monitor request");
    let resp = match req {
        Request::Exec {
            exec_id,
            process,
            stdio,
        } => return exec(stream, &shared, exec_id, process, stdio, fds).await,
        Request::Start => start(&shared).await,
        Request::Kill {
            signal,
            all,
            exec_id,
        } => match shared.status() {
            Status::Stopped => err(format!("container {} is not running", shared.cid)),
            Status::Paused => err(format!(
                "container {} is paused: resume it before signalling it",
                shared.cid
            )),
            _ => match shared
                .agent
                .signal_process(&shared.cid, &exec_id, signal, all)
                .await
            {
                Ok(()) => ok(Value::Null),
                Err(e) => err(error_chain(&e)),
            },
        },
        Request::Resize {
            exec_id,
            rows,
            cols,
        } => match shared
            .agent
            .resize_pty(&shared.cid, &exec_id, rows.into(), cols.into())
            .await
        {
            Ok(()) => ok(Value::Null),
            Err(e) => err(error_chain(&e)),
        },
        Request::Ps => match shared.agent.list_processes(&shared.cid).await {
            Ok(list) => ok(Value::Array(
                list.iter()
                    .map(|p| {
                        json!({"pid": p.pid, "ppid": p.ppid, "uid": p.uid, "state": p.state,
                               "command": p.command, "exec_id": p.exec_id})
                    })
                    .collect(),
            )),
            Err(e) => err(error_chain(&e)),
        },
        Request::Stats => match shared.agent.stats_container(&shared.cid).await {
            Ok(s) => ok(json!({
                "cpu_usage_usec": s.cpu_usage_usec,
                "cpu_user_usec": s.cpu_user_usec,
                "cpu_system_usec": s.cpu_system_usec,
                "cpu_nr_periods": s.cpu_nr_periods,
                "cpu_nr_throttled": s.cpu_nr_throttled,
                "cpu_throttled_usec": s.cpu_throttled_usec,
                "memory_usage": s.memory_usage,
                "memory_limit": s.memory_limit,
                "memory_peak": s.memory_peak,
                "memory_swap_usage": s.memory_swap_usage,
                "memory_oom_kills": s.memory_oom_kills,
                "memory_stat": s.memory_stat,
                "pids_current": s.pids_current,
                "pids_limit": s.pids_limit,
            })),
            Err(e) => err(error_chain(&e)),
        },
        Request::Update { resources } => {
            let body = serde_json::to_vec(&resources).unwrap_or_default();
            match shared.agent.update_container(&shared.cid, body).await {
                Ok(()) => ok(Value::Null),
                Err(e) => err(error_chain(&e)),
            }
        }
        Request::Pause => vm_command(&shared, Status::Running, "pause", Command::Pause).await,
        Request::Resume => vm_command(&shared, Status::Paused, "resume", Command::Resume).await,
        Request::Delete { force } => {
            // When the container ends on its own as the delete arrives, the
            // main loop is gone (or drops the command): the monitor is
            // already tearing the sandbox down, which is what was asked;
            // the caller waits for the monitor to exit.
            let tearing_down = || {
                tracing::debug!("delete while the monitor tears down after the container's exit");
                ok(Value::Null)
            };
            let (tx, rx) = oneshot::channel();
            if shared
                .commands
                .send(Command::Delete { force, reply: tx })
                .await
                .is_err()
            {
                tearing_down()
            } else {
                rx.await.unwrap_or_else(|_| tearing_down())
            }
        }
    };
    let _ = api::write_response(&mut stream, &resp).await;
}

async fn start(shared: &Shared) -> Response {
    let status = shared.status();
    if status != Status::Created {
        return err(format!(
            "cannot start container {}: it is {status}, not created",
            shared.cid
        ));
    }
    match shared.agent.start_container(&shared.cid).await {
        Ok(()) => {
            shared.set_status(Status::Running);
            shared.poststart().await;
            ok(Value::Null)
        }
        Err(e) => err(error_chain(&e)),
    }
}

async fn vm_command(
    shared: &Shared,
    need: Status,
    verb: &str,
    make: fn(oneshot::Sender<Result<(), String>>) -> Command,
) -> Response {
    let status = shared.status();
    if status != need {
        return err(format!(
            "cannot {verb} container {}: it is {status}",
            shared.cid
        ));
    }
    let (tx, rx) = oneshot::channel();
    if shared.commands.send(make(tx)).await.is_err() {
        return err("the monitor is shutting down");
    }
    match rx.await {
        Ok(Ok(())) => ok(Value::Null),
        Ok(Err(e)) => err(e),
        Err(_) => err("the monitor is shutting down"),
    }
}

/// Runs a process in the container; replies `Ok` once it runs and `Exit`
/// when it ends, relaying its stdio meanwhile.
async fn exec(
    mut stream: UnixStream,
    shared: &Shared,
    exec_id: String,
    process: Value,
    stdio: ExecStdio,
    fds: Vec<OwnedFd>,
) {
    let status = shared.status();
    if status != Status::Running {
        let _ = api::write_response(
            &mut stream,
            &err(format!(
                "cannot exec in container {}: it is {status}, not running",
                shared.cid
            )),
        )
        .await;
        return;
    }
    let endpoints: Result<(File, File, File), String> = match stdio {
        ExecStdio::Fds => {
            let mut it = fds.into_iter();
            match (it.next(), it.next(), it.next()) {
                (Some(i), Some(o), Some(e)) => Ok((File::from(i), File::from(o), File::from(e))),
                _ => Err("exec needs three descriptors (stdin, stdout, stderr)".to_string()),
            }
        }
        ExecStdio::ConsoleSocket(path) => console::send_pty_to_console_socket(&path)
            .map_err(|e| error_chain(&e))
            .and_then(|pty| {
                let w = File::from(pty.slave);
                let r = w.try_clone().map_err(|e| e.to_string())?;
                let e = w.try_clone().map_err(|e| e.to_string())?;
                Ok((r, w, e))
            }),
    };
    let (input, output, errput) = match endpoints {
        Ok(x) => x,
        Err(m) => {
            let _ = api::write_response(&mut stream, &err(m)).await;
            return;
        }
    };
    let (input, stop_input) = match stdio::stoppable(input) {
        Ok(x) => x,
        Err(e) => {
            let _ = api::write_response(&mut stream, &err(format!("stdin relay: {e}"))).await;
            return;
        }
    };
    let body = serde_json::to_vec(&process).unwrap_or_default();
    if let Err(e) = shared.agent.exec_process(&shared.cid, &exec_id, body).await {
        let _ = api::write_response(&mut stream, &err(error_chain(&e))).await;
        return;
    }
    let agent = &shared.agent;
    let cid = shared.cid.clone();
    let out = stdio::relay_output(
        agent.clone(),
        cid.clone(),
        exec_id.clone(),
        false,
        tokio::fs::File::from_std(output),
    );
    let errr = stdio::relay_output(
        agent.clone(),
        cid.clone(),
        exec_id.clone(),
        true,
        tokio::fs::File::from_std(errput),
    );
    stdio::relay_input(agent.clone(), cid.clone(), exec_id.clone(), input);
    let _ = api::write_response(&mut stream, &ok(Value::Null)).await;
    let waited = agent.wait_process(&cid, &exec_id).await;
    // The process is gone: stop reading the caller's stdin (a terminal or
    // a pipe it may keep open), so the descriptor is released now.
    drop(stop_input);
    let status = match waited {
        Ok(s) => s.status,
        Err(e) => {
            let _ = api::write_response(&mut stream, &err(error_chain(&e))).await;
            return;
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
        let _ = out.await;
        let _ = errr.await;
    })
    .await;
    let _ = api::write_response(&mut stream, &Response::Exit { status }).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drained_waits_for_requests_in_flight() {
        let f = InFlight::default();
        let g = f.enter();
        let done = tokio::spawn({
            let f = f.clone();
            async move { f.drained(Duration::from_secs(30)).await }
        });
        tokio::task::yield_now().await;
        assert!(!done.is_finished());
        drop(g);
        tokio::time::timeout(Duration::from_secs(5), done)
            .await
            .expect("drained returns once the last request ends")
            .unwrap();
    }

    /// A monitor whose main loop has ended (the container exited on its
    /// own) and whose agent socket leads nowhere.
    async fn ended_monitor(dir: &std::path::Path) -> Arc<Shared> {
        let sock = dir.join("agent.sock");
        let _listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let agent = crate::agent::AgentClient::connect(&sock).await.unwrap();
        let (commands, ended) = tokio::sync::mpsc::channel(1);
        drop(ended);
        Arc::new(Shared {
            agent,
            hooks: Default::default(),
            cid: "c".into(),
            dir: dir.to_path_buf(),
            state: std::sync::Mutex::new(crate::state::ContainerState {
                id: "c".into(),
                bundle: dir.into(),
                rootfs: dir.join("rootfs"),
                status: Status::Stopped,
                pid: 1,
                pid_start_time: 0,
                created: String::new(),
                annotations: Default::default(),
                owner: String::new(),
                exit_status: Some(0),
                vm_pid: None,
            }),
            commands,
            in_flight: InFlight::default(),
        })
    }

    #[tokio::test]
    async fn a_delete_racing_the_containers_exit_succeeds() {
        let dir = std::env::temp_dir().join(format!("husk-handlers-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let shared = ended_monitor(&dir).await;
        let (client, server) = tokio::net::UnixStream::pair().unwrap();
        let served = tokio::spawn(handle(server, shared));
        let mut client = client.into_std().unwrap();
        client.set_nonblocking(false).unwrap();
        let reply = tokio::task::spawn_blocking(move || {
            api::send_request(&mut client, &Request::Delete { force: true }, &[]).unwrap();
            api::recv_response(&mut client).unwrap()
        })
        .await
        .unwrap();
        served.await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(matches!(reply, Response::Ok { .. }), "{reply:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn drained_gives_up_after_its_timeout() {
        let f = InFlight::default();
        let _g = f.enter();
        f.drained(Duration::from_secs(3)).await;
    }
}

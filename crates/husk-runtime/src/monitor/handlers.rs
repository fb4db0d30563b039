//! The monitor's API socket: one task per connection, one request each.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;

use super::api::{self, ExecStdio, Request, Response};
use super::error_chain;
use crate::console;
use crate::sandbox::{Sandbox, SandboxError, Stdio};
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

pub(crate) async fn accept_loop(
    listener: UnixListener,
    sandbox: Arc<Sandbox>,
    in_flight: InFlight,
) {
    loop {
        match listener.accept().await {
            Ok((mut stream, _)) => {
                let peer = stream.peer_cred().map(|c| c.uid());
                let me = nix::unistd::geteuid().as_raw();
                if let Err(why) = peer_allowed(peer.ok(), me) {
                    tracing::warn!("monitor socket: {why}");
                    tokio::spawn(async move {
                        let _ = api::write_response(&mut stream, &err(why)).await;
                    });
                    continue;
                }
                let guard = in_flight.enter();
                let sandbox = sandbox.clone();
                tokio::spawn(async move {
                    handle(stream, sandbox).await;
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

/// Only this monitor's own user (and root) may drive it: the socket's mode
/// already says so, and the peer's credentials are checked as well, since
/// a descriptor of the socket can be passed on.
fn peer_allowed(peer_uid: Option<u32>, me: u32) -> Result<(), String> {
    match peer_uid {
        Some(uid) if uid == me || uid == 0 => Ok(()),
        Some(uid) => Err(format!(
            "refused a client of uid {uid}: only uid {me} (and root) may drive this container"
        )),
        None => Err("refused a client whose credentials cannot be read".into()),
    }
}

fn err(message: impl Into<String>) -> Response {
    Response::Error {
        message: message.into(),
    }
}

fn reply<T>(r: Result<T, SandboxError>, ok: impl FnOnce(T) -> Response) -> Response {
    match r {
        Ok(v) => ok(v),
        Err(e) => err(error_chain(&e)),
    }
}

fn done(_: ()) -> Response {
    Response::Done
}

/// One request: a thin mapping onto the sandbox's lifecycle.
async fn handle(mut stream: UnixStream, sandbox: Arc<Sandbox>) {
    let (req, fds) = match api::read_request(&mut stream).await {
        Ok(r) => r,
        Err(e) => {
            let _ = api::write_response(&mut stream, &err(error_chain(&e))).await;
            return;
        }
    };
    tracing::debug!(?req, "monitor request");
    let cid = sandbox.id().to_string();
    let s = &sandbox;
    let resp = match req {
        Request::Exec {
            exec_id,
            process,
            stdio,
        } => return exec(stream, s, exec_id, *process, stdio, fds).await,
        Request::Start => reply(s.start(&cid).await, done),
        Request::Kill {
            signal,
            all,
            exec_id,
        } => reply(s.kill(&cid, &exec_id, signal, all).await, done),
        Request::Resize {
            exec_id,
            rows,
            cols,
        } => reply(
            s.resize(&cid, &exec_id, rows.into(), cols.into()).await,
            done,
        ),
        Request::Ps => reply(s.ps(&cid).await, |processes| Response::Processes {
            processes,
        }),
        Request::Stats => reply(s.stats(&cid).await, |stats| Response::Stats { stats }),
        Request::Update { resources } => {
            let body = serde_json::to_vec(&resources).unwrap_or_default();
            reply(s.update(&cid, body).await, done)
        }
        Request::Pause => reply(s.pause(&cid).await, done),
        Request::Resume => reply(s.resume(&cid).await, done),
        Request::Delete { force } => match s.delete(&cid, force).await {
            Ok(_) => Response::Done,
            // The container ended on its own as the delete arrived: the
            // monitor is already tearing the sandbox down, which is what
            // was asked; the caller waits for the monitor to exit.
            Err(SandboxError::NotFound(_)) => {
                tracing::debug!("delete while the monitor tears down after the container's exit");
                Response::Done
            }
            Err(e) => err(error_chain(&e)),
        },
    };
    let _ = api::write_response(&mut stream, &resp).await;
}

/// Runs a process in the container; replies `Done` once it runs and `Exit`
/// when it ends, relaying its stdio meanwhile.
async fn exec(
    mut stream: UnixStream,
    sandbox: &Arc<Sandbox>,
    exec_id: String,
    process: oci_spec::runtime::Process,
    stdio: ExecStdio,
    fds: Vec<OwnedFd>,
) {
    let cid = sandbox.id().to_string();
    let terminal = process.terminal().unwrap_or(false);
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
    let endpoints = Stdio {
        stdin: Some(Box::new(input)),
        stdout: Box::new(tokio::fs::File::from_std(output)),
        stderr: Box::new(tokio::fs::File::from_std(errput)),
        terminal,
    };
    if let Err(e) = sandbox.exec(&cid, &exec_id, body, endpoints).await {
        let _ = api::write_response(&mut stream, &err(error_chain(&e))).await;
        return;
    }
    let _ = api::write_response(&mut stream, &Response::Done).await;
    let waited = match sandbox.wait(&cid, &exec_id) {
        Ok(mut rx) => rx.wait_for(Option::is_some).await.ok().and_then(|e| *e),
        Err(_) => None,
    };
    // The process is gone: stop reading the caller's stdin (a terminal or
    // a pipe it may keep open), so the descriptor is released now.
    drop(stop_input);
    let resp = match waited {
        Some(exit) => {
            let _ = sandbox.delete_exec(&cid, &exec_id).await;
            Response::Exit {
                status: exit.status.status,
            }
        }
        None => err(format!(
            "container {cid} went away while exec {exec_id} ran"
        )),
    };
    let _ = api::write_response(&mut stream, &resp).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_owner_and_root_drive_the_monitor() {
        assert!(peer_allowed(Some(1000), 1000).is_ok());
        assert!(peer_allowed(Some(0), 1000).is_ok());
        let e = peer_allowed(Some(1001), 1000).unwrap_err();
        assert!(e.contains("uid 1001") && e.contains("only uid 1000"), "{e}");
        assert!(peer_allowed(None, 0).is_err());
    }

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

    #[tokio::test(start_paused = true)]
    async fn drained_gives_up_after_its_timeout() {
        let f = InFlight::default();
        let _g = f.enter();
        f.drained(Duration::from_secs(3)).await;
    }
}

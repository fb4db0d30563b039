//! ExecProcess, the agent's side: an extra process in a running container,
//! started through the exec stage (`exec_stage.rs`) and then addressed by
//! `(container_id, exec_id)` exactly like the init.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::sync::Arc;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::io::{AsyncWriteExt, BufReader};

use super::exec_stage::ExecConfig;
use super::launch::next_message;
use super::spec::{self, InitMessage};
use super::stdio::{self, pipe};
use super::{ContainerError, Containers, ExecSlot};
use crate::process::spawn::{clone_exec, CloneExec};
use crate::process::stdio::FdIo;
use crate::process::{wait_exit, ExitStatus};

/// Frees a reserved exec id unless the exec started.
struct ExecReservation<'a> {
    container: &'a super::Container,
    exec_id: &'a str,
    done: bool,
}

impl Drop for ExecReservation<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.container.execs().remove(self.exec_id);
        }
    }
}

impl Containers {
    /// Starts `process_json` (an OCI process) in container `id` as
    /// `exec_id`; returns once it runs its program.
    pub async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process_json: &[u8],
    ) -> Result<(), ContainerError> {
        if exec_id.is_empty() {
            return Err(ContainerError::EmptyExecId(id.to_string()));
        }
        let container = self.get(id)?;
        if let Some(status) = container.process.exit_status() {
            return Err(ContainerError::NotRunning {
                id: id.to_string(),
                status,
            });
        }
        let (process, notes) = spec::parse_exec_process(process_json)?;
        for note in notes {
            tracing::warn!(container = id, exec = exec_id, "{note}");
        }
        {
            let mut execs = container.execs();
            if execs.contains_key(exec_id) {
                return Err(ContainerError::ExecExists {
                    id: id.to_string(),
                    exec_id: exec_id.to_string(),
                });
            }
            execs.insert(exec_id.to_string(), ExecSlot::Starting);
        }
        let mut reservation = ExecReservation {
            container: &container,
            exec_id,
            done: false,
        };
        let failed = |message: String, invalid_spec: bool| ContainerError::ExecFailed {
            id: id.to_string(),
            exec_id: exec_id.to_string(),
            message,
            invalid_spec,
        };
        let io_err = |what: &'static str| {
            move |source: io::Error| ContainerError::Io {
                id: id.to_string(),
                what,
                source,
            }
        };

        let (child_stdio, pending_stdio) = if process.terminal {
            stdio::terminal().map_err(io_err("preparing the terminal's console socket"))?
        } else {
            stdio::pipes().map_err(io_err("creating stdio pipes"))?
        };
        let config = ExecConfig {
            init_pid: container.process.pid().as_raw(),
            process,
            seccomp: container.seccomp.clone(),
            die_with_agent: self.options.die_with_agent,
        };
        let json = serde_json::to_vec(&config)
            .map_err(|e| io_err("encoding the exec instructions")(io::Error::other(e)))?;
        let (config_r, config_w) = pipe().map_err(io_err("creating the config pipe"))?;
        let (status_r, status_w) = pipe().map_err(io_err("creating the status pipe"))?;
        let (start_r, start_w) = pipe().map_err(io_err("creating the start pipe"))?;
        let argv = [CString::from(c"husk-agent"), CString::from(c"exec")];
        let fds = child_stdio.stage_fds(config_r.as_fd(), status_w.as_fd(), start_r.as_fd());
        let request = CloneExec {
            namespaces: nix::sched::CloneFlags::empty(),
            program: &self.options.agent_exe,
            argv: &argv,
            fds,
            parent_death_signal: self.options.die_with_agent.then_some(Signal::SIGKILL),
            hold_fd: None,
            become_userns_root: false,
        };
        // The exec'd process becomes our child before we learn its pid.
        let window = self.reaper.adoption_window();
        let (stage_pid, stage_exit) = self
            .reaper
            .spawn(|| clone_exec(&request))
            .map_err(io_err("starting the exec stage (clone)"))?;
        drop(request);
        drop((child_stdio, config_r, status_w, start_r));
        tracing::debug!(
            container = id,
            exec = exec_id,
            stage = stage_pid.as_raw(),
            "exec stage started"
        );

        let mut status =
            BufReader::new(FdIo::new(status_r).map_err(io_err("watching the status pipe"))?);
        let fed = async {
            let mut config_pipe = FdIo::new(config_w)?;
            config_pipe.write_all(&json).await
        };
        if let Err(e) = fed.await {
            tracing::debug!(container = id, "writing the exec instructions failed: {e}");
        }
        let pid = match next_message(id, &mut status).await {
            Ok(Some(InitMessage::Pid(pid))) => Pid::from_raw(pid),
            Ok(Some(InitMessage::Error {
                message,
                invalid_spec,
            })) => return Err(failed(message, invalid_spec)),
            _ => {
                let mut exit = stage_exit;
                let stage = exit
                    .wait_for(Option::is_some)
                    .await
                    .map(|s| s.unwrap_or(ExitStatus::exited(-1)))
                    .unwrap_or(ExitStatus::exited(-1));
                return Err(failed(
                    format!("the exec stage {stage} without starting the process; the guest log may say why"),
                    false,
                ));
            }
        };
        let exit = self.reaper.adopt(&window, pid);
        drop(window);
        // With a terminal, the stage sent its master before the pid.
        let stdio = match pending_stdio.finish(&format!("container {id}, exec {exec_id}")) {
            Ok(stdio) => stdio,
            Err(source) => {
                let _ = self.reaper.signal(pid, Signal::SIGKILL as i32);
                wait_exit(pid, &exit).await;
                return Err(failed(format!("taking over its stdio: {source}"), false));
            }
        };
        let process = stdio.into_process(pid, exit);

        if let Some(cgroup) = &container.cgroup {
            if let Err(source) = cgroup.add(pid.as_raw()) {
                let _ = self.reaper.signal(pid, Signal::SIGKILL as i32);
                process.wait().await;
                return Err(ContainerError::Cgroup {
                    id: id.to_string(),
                    source,
                });
            }
        }
        let mut start = File::from(start_w);
        if start.write_all(b"s").is_err() {
            let status = process.wait().await;
            return Err(failed(
                format!("the process {status} before it ran its program"),
                false,
            ));
        }
        drop(start);
        match next_message(id, &mut status).await {
            Ok(None) => {}
            Ok(Some(InitMessage::Error {
                message,
                invalid_spec,
            })) => {
                process.wait().await;
                return Err(failed(message, invalid_spec));
            }
            Ok(Some(other)) => tracing::warn!(
                container = id,
                exec = exec_id,
                "unexpected message from the exec'd process: {other:?}"
            ),
            Err(source) => {
                let _ = self.reaper.signal(pid, Signal::SIGKILL as i32);
                process.wait().await;
                return Err(ContainerError::Io {
                    id: id.to_string(),
                    what: "reading the exec'd process's status",
                    source,
                });
            }
        }
        container
            .execs()
            .insert(exec_id.to_string(), ExecSlot::Ready(Arc::new(process)));
        reservation.done = true;
        // The init may have died meanwhile; its watcher only saw the execs
        // that were ready.
        if container.process.exit_status().is_some() {
            let _ = self.reaper.signal(pid, Signal::SIGKILL as i32);
        }
        tracing::info!(
            container = id,
            exec = exec_id,
            pid = pid.as_raw(),
            "exec started"
        );
        Ok(())
    }
}

//! ExecProcess, the agent's side: an extra process in a running container,
//! started through the exec stage (`exec_stage.rs`) and then addressed by
//! `(container_id, exec_id)` exactly like the init.

use std::sync::Arc;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::exec_stage::ExecConfig;
use super::launch::{Launched, StageKind, StageLaunch, Started};
use super::lookup::Reservation;
use super::protocol::StageMessage;
use super::spec;
use super::{ContainerError, Containers, ExecSlot};
use crate::process::ExitStatus;

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
        let Some(reservation) = Reservation::new(&container.execs, exec_id, ExecSlot::Starting)
        else {
            return Err(ContainerError::ExecExists {
                id: id.to_string(),
                exec_id: exec_id.to_string(),
            });
        };
        let failed = |message: String, invalid_spec: bool| ContainerError::ExecFailed {
            id: id.to_string(),
            exec_id: exec_id.to_string(),
            message,
            invalid_spec,
        };
        let config = ExecConfig {
            init_pid: container.process.pid().as_raw(),
            seccomp: container.seccomp.clone(),
            die_with_agent: self.options.die_with_agent,
            process,
        };
        let launch = StageLaunch {
            kind: StageKind::Exec,
            terminal: config.process.terminal,
            namespaces: nix::sched::CloneFlags::empty(),
            pid_namespace: None,
            hold: None,
        };
        // The exec'd process becomes our child before we learn its pid.
        let window = self.reaper.adoption_window();
        let Launched {
            pid: stage_pid,
            exit: stage_exit,
            stdio,
            mut control,
        } = self.launch_stage(id, &launch, &config).await?;
        tracing::debug!(
            container = id,
            exec = exec_id,
            stage = stage_pid.as_raw(),
            "exec stage started"
        );
        let pid = match control.next_message(id).await {
            Ok(Some(StageMessage::Pid(pid))) => Pid::from_raw(pid),
            Ok(Some(StageMessage::Error {
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
        let label = format!("container {id}, exec {exec_id}");
        let process = self
            .take_over(stdio, &label, pid, exit)
            .await
            .map_err(|source| failed(format!("taking over its stdio: {source}"), false))?;

        if let Some(cgroup) = &container.cgroup {
            if let Err(source) = cgroup.add(pid.as_raw()) {
                self.kill_and_wait(&process).await;
                return Err(ContainerError::Cgroup {
                    id: id.to_string(),
                    source,
                });
            }
        }
        match control.start(id).await {
            Started::Running => {}
            Started::Gone => {
                let status = process.wait().await;
                return Err(failed(
                    format!("the process {status} before it ran its program"),
                    false,
                ));
            }
            Started::Failed {
                message,
                invalid_spec,
            } => {
                process.wait().await;
                return Err(failed(message, invalid_spec));
            }
            Started::Unexpected(other) => tracing::warn!(
                container = id,
                exec = exec_id,
                "unexpected message from the exec'd process: {other:?}"
            ),
            Started::Unreadable(source) => {
                self.kill_and_wait(&process).await;
                return Err(ContainerError::Io {
                    id: id.to_string(),
                    what: "reading the exec'd process's status",
                    source,
                });
            }
        }
        reservation.fill(ExecSlot::Ready(Arc::new(process)));
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

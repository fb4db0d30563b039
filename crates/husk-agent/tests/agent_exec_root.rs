//! ExecProcess, ResizePty, ListProcesses and SignalProcess(all) against the
//! agent as a plain process (root). Each test starts its own agent and ends
//! with its leak check.

mod support;

use husk_protocol::agent::{
    ContainerRequest, ReadStreamRequest, ResizePtyRequest, SignalProcessRequest, WriteStreamRequest,
};
use serde_json::json;
use support::{ctx, exec_process, spec, status_of, Agent, CgroupDir};
use ttrpc::Code;

fn signal(id: &str, exec_id: &str, signal: i32, all: bool) -> SignalProcessRequest {
    SignalProcessRequest {
        container_id: id.into(),
        exec_id: exec_id.into(),
        signal,
        all,
        ..Default::default()
    }
}

async fn ps(agent: &Agent, id: &str) -> Vec<husk_protocol::agent::ProcessInfo> {
    let request = ContainerRequest {
        container_id: id.into(),
        ..Default::default()
    };
    agent
        .client
        .list_processes(ctx(), &request)
        .await
        .expect("ListProcesses")
        .processes
}

#[tokio::test(flavor = "multi_thread")]
async fn root_exec_runs_inside_the_container() {
    let agent = Agent::start().await;
    let rootfs = agent.rootfs("exec");
    std::fs::write(rootfs.join("marker"), "in the rootfs\n").unwrap();
    let mut spec = spec(&rootfs, &["sleep", "1000"]);
    spec["hostname"] = json!("exec-host");
    agent.run("exec", &spec).await;

    let (out, err, status) = agent
        .exec_to_end(
            "exec",
            "e1",
            &exec_process(&[
                "sh",
                "-c",
                "hostname; cat /marker; echo oops >&2; readlink /proc/1/exe; exit 7",
            ]),
        )
        .await;
    assert_eq!(
        out, "exec-host\nin the rootfs\n/bin/busybox\n",
        "stderr: {err}"
    );
    assert_eq!(err, "oops\n");
    assert_eq!((status.exit_status, status.signal), (7, 0));
    // Waiting again returns the stored status.
    assert_eq!(agent.wait_exec("exec", "e1").await.unwrap().exit_status, 7);

    // Errors: missing binary, duplicate id, empty id, unknown container.
    let (code, message) = status_of(
        agent
            .exec("exec", "e2", &exec_process(&["nosuchcmd"]))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, Code::INVALID_ARGUMENT, "{message}");
    assert!(message.contains("\"nosuchcmd\""), "{message}");
    let (code, message) = status_of(
        agent
            .exec("exec", "e1", &exec_process(&["true"]))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, Code::ALREADY_EXISTS, "{message}");
    let (code, _) = status_of(
        agent
            .exec("exec", "", &exec_process(&["true"]))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, Code::INVALID_ARGUMENT);
    let (code, _) = status_of(
        agent
            .exec("nope", "e1", &exec_process(&["true"]))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, Code::NOT_FOUND);
    let (code, _) = status_of(agent.wait_exec("exec", "e9").await.unwrap_err());
    assert_eq!(code, Code::NOT_FOUND);
    // The failed exec id is free again.
    let (out, _, status) = agent
        .exec_to_end("exec", "e2", &exec_process(&["echo", "second"]))
        .await;
    assert_eq!((out.as_str(), status.exit_status), ("second\n", 0));
    agent.remove("exec").await.unwrap();
    agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn root_exec_stdin_user_env_and_signals() {
    let agent = Agent::start().await;
    let rootfs = agent.rootfs("execio");
    agent
        .run("execio", &spec(&rootfs, &["sleep", "1000"]))
        .await;
    let mut process = exec_process(&["sh", "-c", "id -u; echo $FOO; pwd; cat"]);
    process["user"] = json!({"uid": 1000, "gid": 1000});
    process["env"] = json!(["PATH=/bin", "FOO=bar"]);
    process["cwd"] = json!("/tmp");
    agent.exec("execio", "cat", &process).await.unwrap();
    agent
        .client
        .write_stdin(
            ctx(),
            &WriteStreamRequest {
                container_id: "execio".into(),
                exec_id: "cat".into(),
                data: b"piped\n".to_vec(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let request = husk_protocol::agent::ProcessRequest {
        container_id: "execio".into(),
        exec_id: "cat".into(),
        ..Default::default()
    };
    agent.client.close_stdin(ctx(), &request).await.unwrap();
    let out = agent.read_all_of("execio", "cat", false).await;
    assert_eq!(String::from_utf8_lossy(&out), "1000\nbar\n/tmp\npiped\n");
    assert_eq!(
        agent.wait_exec("execio", "cat").await.unwrap().exit_status,
        0
    );

    agent
        .exec("execio", "sleeper", &exec_process(&["sleep", "1000"]))
        .await
        .unwrap();
    agent
        .client
        .signal_process(ctx(), &signal("execio", "sleeper", 9, false))
        .await
        .unwrap();
    let status = agent.wait_exec("execio", "sleeper").await.unwrap();
    assert_eq!((status.exit_status, status.signal), (137, 9));
    let (code, _) = status_of(
        agent
            .client
            .signal_process(ctx(), &signal("execio", "sleeper", 9, false))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, Code::NOT_FOUND);
    // The init is untouched.
    let still_running =
        tokio::time::timeout(std::time::Duration::from_millis(100), agent.wait("execio")).await;
    assert!(still_running.is_err(), "the init exited: {still_running:?}");
    agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn root_exec_terminal_without_devpts_fails_cleanly() {
    let agent = Agent::start().await;
    let rootfs = agent.rootfs("execnopts");
    let mut spec = spec(&rootfs, &["sleep", "1000"]);
    spec["mounts"]
        .as_array_mut()
        .unwrap()
        .retain(|m| m["destination"] != "/dev/pts");
    agent.run("execnopts", &spec).await;
    let mut process = exec_process(&["tty"]);
    process["terminal"] = json!(true);
    let (_, message) = status_of(agent.exec("execnopts", "t", &process).await.unwrap_err());
    assert!(
        message.contains("opening /dev/ptmx in the container") && message.contains("devpts"),
        "{message}"
    );
    // The exec id is free again; without a terminal the exec works.
    let (out, _, status) = agent
        .exec_to_end("execnopts", "t", &exec_process(&["echo", "fine"]))
        .await;
    assert_eq!((status.exit_status, out.as_str()), (0, "fine\n"));
    agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn root_exec_with_a_terminal_and_resize() {
    let agent = Agent::start().await;
    let rootfs = agent.rootfs("exectty");
    agent
        .run("exectty", &spec(&rootfs, &["sleep", "1000"]))
        .await;
    let mut process = exec_process(&[
        "sh",
        "-c",
        "test -t 0 && echo is-a-tty; echo tty=$(tty); stty size; read line; stty size",
    ]);
    process["terminal"] = json!(true);
    process["consoleSize"] = json!({"height": 20, "width": 70});
    agent.exec("exectty", "tty", &process).await.unwrap();
    let mut out = Vec::new();
    while !String::from_utf8_lossy(&out).contains("20 70") {
        let chunk = agent
            .client
            .read_stdout(
                ctx(),
                &ReadStreamRequest {
                    container_id: "exectty".into(),
                    exec_id: "tty".into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap()
            .data;
        assert!(!chunk.is_empty(), "EOF before the size: {out:?}");
        out.extend(chunk);
    }
    agent
        .client
        .resize_pty(
            ctx(),
            &ResizePtyRequest {
                container_id: "exectty".into(),
                exec_id: "tty".into(),
                rows: 40,
                cols: 120,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    agent
        .client
        .write_stdin(
            ctx(),
            &WriteStreamRequest {
                container_id: "exectty".into(),
                exec_id: "tty".into(),
                data: b"go\r".to_vec(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    out.extend(agent.read_all_of("exectty", "tty", false).await);
    let out = String::from_utf8_lossy(&out);
    assert!(out.contains("is-a-tty"), "{out:?}");
    // The terminal is in the container's own devpts, so it has a name there.
    let tty = support::line_value(&out, "tty").unwrap_or_default();
    assert!(support::is_pts_name(tty), "tty printed {tty:?}: {out:?}");
    assert!(out.contains("40 120"), "{out:?}");
    assert_eq!(agent.read_all_of("exectty", "tty", true).await, b"");
    assert_eq!(
        agent.wait_exec("exectty", "tty").await.unwrap().exit_status,
        0
    );
    // The init has no terminal.
    let (code, _) = status_of(
        agent
            .client
            .resize_pty(
                ctx(),
                &ResizePtyRequest {
                    container_id: "exectty".into(),
                    rows: 1,
                    cols: 1,
                    ..Default::default()
                },
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(code, Code::FAILED_PRECONDITION);
    agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn root_exec_into_a_stopped_container_fails() {
    let agent = Agent::start().await;
    let rootfs = agent.rootfs("stopped");
    let (_, _, status) = agent.run_to_end("stopped", &spec(&rootfs, &["true"])).await;
    assert_eq!(status.exit_status, 0);
    let (code, message) = status_of(
        agent
            .exec("stopped", "late", &exec_process(&["true"]))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, Code::FAILED_PRECONDITION, "{message}");
    assert!(message.contains("not running"), "{message}");
    agent.stop();
}

/// Without a PID namespace the agent kills the execs when the init dies.
#[tokio::test(flavor = "multi_thread")]
async fn root_execs_die_with_the_init_without_a_pid_namespace() {
    let agent = Agent::start().await;
    let rootfs = agent.rootfs("nopidns");
    let mut spec = spec(&rootfs, &["sleep", "1000"]);
    spec["linux"]["namespaces"] = json!([{"type": "mount"}, {"type": "uts"}]);
    // /proc shows the guest's processes: do not mask it into trouble.
    agent.run("nopidns", &spec).await;
    agent
        .exec("nopidns", "bg", &exec_process(&["sleep", "1000"]))
        .await
        .unwrap();
    agent
        .client
        .signal_process(ctx(), &signal("nopidns", "", 9, false))
        .await
        .unwrap();
    let status = agent.wait_exec("nopidns", "bg").await.unwrap();
    assert_eq!(status.signal, 9);
    agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn root_ps_and_signal_all_with_cgroups() {
    let cgroups = CgroupDir::new("ps");
    let agent = Agent::with_cgroups(&cgroups).await;
    let rootfs = agent.rootfs("ps");
    agent
        .run(
            "ps",
            &spec(&rootfs, &["sh", "-c", "sleep 1000 & sleep 1001 & wait"]),
        )
        .await;
    let mut process = exec_process(&["sleep", "1002"]);
    process["user"] = json!({"uid": 1234, "gid": 1234});
    agent.exec("ps", "ex", &process).await.unwrap();
    // Four processes, and the shell's two children past their exec (a
    // child forked but not yet exec'd still shows the shell's command).
    support::wait_until(
        std::time::Duration::from_secs(10),
        "both sleeps to run",
        || {
            let procs =
                std::fs::read_to_string(cgroups.0.join("ps/cgroup.procs")).unwrap_or_default();
            let commands: Vec<String> = procs
                .lines()
                .map(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default())
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .collect();
            commands.len() == 4
                && ["sleep 1000 ", "sleep 1001 "]
                    .iter()
                    .all(|sleep| commands.iter().any(|c| c == sleep))
        },
    );
    let list = ps(&agent, "ps").await;
    let commands: Vec<&str> = list.iter().map(|p| p.command.as_str()).collect();
    assert_eq!(list.len(), 4, "{list:?}");
    assert!(
        commands.contains(&"sh -c sleep 1000 & sleep 1001 & wait"),
        "{commands:?}"
    );
    assert!(commands.contains(&"sleep 1000"), "{commands:?}");
    let exec = list.iter().find(|p| p.command == "sleep 1002").unwrap();
    assert_eq!(exec.exec_id, "ex");
    assert_eq!(exec.uid, 1234);
    assert!(["R", "S"].contains(&exec.state.as_str()), "{exec:?}");
    let init = list.iter().find(|p| p.command.starts_with("sh")).unwrap();
    assert_eq!(init.exec_id, "");
    assert!(list
        .iter()
        .filter(|p| p.command.starts_with("sleep 100") && p.exec_id.is_empty())
        .all(|p| p.ppid == init.pid));

    // SIGTERM to all: the sleeps and the exec die, and then the shell's
    // `wait` returns and the init exits by itself.
    agent
        .client
        .signal_process(ctx(), &signal("ps", "", 15, true))
        .await
        .unwrap();
    let status = agent.wait_exec("ps", "ex").await.unwrap();
    assert_eq!(status.signal, 15);
    let status = agent.wait("ps").await.unwrap();
    assert_eq!(status.exit_status, 0);
    // Nothing is left to signal.
    let (code, _) = status_of(
        agent
            .client
            .signal_process(ctx(), &signal("ps", "", 9, true))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, Code::NOT_FOUND);
    assert!(ps(&agent, "ps").await.is_empty());
    agent.remove("ps").await.unwrap();
    assert!(!cgroups.0.join("ps").exists(), "the cgroup was not removed");
    agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn root_ps_without_cgroups_uses_the_pid_namespace() {
    let agent = Agent::start().await;
    let rootfs = agent.rootfs("psns");
    agent
        .run("psns", &spec(&rootfs, &["sh", "-c", "sleep 1000 & wait"]))
        .await;
    agent
        .exec("psns", "ex", &exec_process(&["sleep", "1001"]))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let list = loop {
        let list = ps(&agent, "psns").await;
        if list.len() == 3 {
            break list;
        }
        assert!(std::time::Instant::now() < deadline, "{list:?}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    assert!(list
        .iter()
        .any(|p| p.exec_id == "ex" && p.command == "sleep 1001"));
    agent
        .client
        .signal_process(ctx(), &signal("psns", "", 9, true))
        .await
        .unwrap();
    assert_eq!(agent.wait("psns").await.unwrap().signal, 9);
    agent.stop();
}

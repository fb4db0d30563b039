//! The agent as a plain process (`husk-agent --listen unix:...`), driven
//! through its real ttrpc API. Every test here needs root (namespaces,
//! mounts) and is named `root_*`; each starts its own agent and ends by
//! checking that no process or mount outlived it.

mod support;

use std::time::Duration;

use husk_protocol::agent::{
    CheckRequest, ContainerRequest, Empty, ReadStreamRequest, SignalProcessRequest,
    WriteStreamRequest,
};
use serde_json::json;
use support::{ctx, process, spec, status_of, Agent};
use ttrpc::Code;

#[tokio::test(flavor = "multi_thread")]
async fn root_check_reports_versions() {
    let agent = Agent::start().await;
    let reply = agent
        .client
        .check(
            ctx(),
            &CheckRequest {
                api_version: husk_protocol::API_VERSION,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(reply.api_version, husk_protocol::API_VERSION);
    assert_eq!(reply.agent_version, env!("CARGO_PKG_VERSION"));
    let release = nix::sys::utsname::uname().unwrap();
    assert_eq!(reply.kernel_release, release.release().to_string_lossy());

    let error = agent
        .client
        .check(
            ctx(),
            &CheckRequest {
                api_version: 99,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    let (code, message) = status_of(error);
    assert_eq!(code, Code::FAILED_PRECONDITION);
    assert!(message.contains("99") && message.contains('1'), "{message}");
    agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn root_echo_hello() {
    let agent = Agent::start().await;
    let rootfs = agent.rootfs("echo");
    let (out, err, status) = agent
        .run_to_end("echo", &spec(&rootfs, &["echo", "hello"]))
        .await;
    assert_eq!(out, "hello\n");
    assert_eq!(err, "");
    assert_eq!((status.exit_status, status.signal), (0, 0));
    // Waiting again returns the stored status.
    let again = agent.wait("echo").await.unwrap();
    assert_eq!(again.exit_status, 0);
    agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn root_exit_status_and_stderr() {
    let agent = Agent::start().await;
    let rootfs = agent.rootfs("exit");
    let (out, err, status) = agent
        .run_to_end(
            "exit",
            &spec(&rootfs, &["sh", "-c", "echo oops >&2; exit 3"]),
        )
        .await;
    assert_eq!(out, "");
    assert_eq!(err, "oops\n");
    assert_eq!((status.exit_status, status.signal), (3, 0));
    agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn root_sigkill_gives_137_and_then_not_found() {
    let agent = Agent::start().await;
    let rootfs = agent.rootfs("kill");
    agent.run("kill", &spec(&rootfs, &["sleep", "1000"])).await;
    let signal = |sig| SignalProcessRequest {
        container_id: "kill".into(),
        signal: sig,
        ..Default::default()
    };
    agent
        .client
        .signal_process(ctx(), &signal(9))
        .await
        .unwrap();
    let status = agent.wait("kill").await.unwrap();
    assert_eq!((status.exit_status, status.signal), (137, 9));
    let (code, message) = status_of(
        agent
            .client
            .signal_process(ctx(), &signal(15))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, Code::NOT_FOUND);
    assert!(message.contains("already exited"), "{message}");
    agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn root_sigterm_reaches_a_shell_that_traps_it() {
    let agent = Agent::start().await;
    let rootfs = agent.rootfs("term");
    let script = "trap 'echo got-term; exit 42' TERM; echo ready; while true; do sleep 0.05; done";
    agent
        .run("term", &spec(&rootfs, &["sh", "-c", script]))
        .await;
    let first = agent
        .client
        .read_stdout(
            ctx(),
            &ReadStreamRequest {
                container_id: "term".into(),
                max_len: 6,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(first.data, b"ready\n");
    let request = SignalProcessRequest {
        container_id: "term".into(),
        signal: 15,
        ..Default::default()
    };
    agent.client.signal_process(ctx(), &request).await.unwrap();
    let status = agent.wait("term").await.unwrap();
    assert_eq!((status.exit_status, status.signal), (42, 0));
    assert_eq!(agent.read_all("term", false).await, b"got-term\n");
    agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn root_stdin_reaches_cat() {
    let agent = Agent::start().await;
    let rootfs = agent.rootfs("cat");
    agent.run("cat", &spec(&rootfs, &["cat"])).await;
    let mut sent = Vec::new();
    for line in ["first line\n", "second line\n"] {
        let request = WriteStreamRequest {
            container_id: "cat".into(),
            data: line.as_bytes().to_vec(),
            ..Default::default()
        };
        let mut data = line.as_bytes();
        while !data.is_empty() {
            let written = agent
                .client
                .write_stdin(
                    ctx(),
                    &WriteStreamRequest {
                        data: data.to_vec(),
                        ..request.clone()
                    },
                )
                .await
                .unwrap()
                .len as usize;
            data = &data[written..];
        }
        sent.extend_from_slice(line.as_bytes());
    }
    agent
        .client
        .close_stdin(ctx(), &process("cat"))
        .await
        .unwrap();
    let out = agent.read_all("cat", false).await;
    assert_eq!(out, sent);
    assert_eq!(agent.wait("cat").await.unwrap().exit_status, 0);
    // Writing after CloseStdin is refused.
    let (code, _) = status_of(
        agent
            .client
            .write_stdin(
                ctx(),
                &WriteStreamRequest {
                    container_id: "cat".into(),
                    data: b"late".to_vec(),
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
async fn root_ten_megabytes_of_stdout_arrive_complete_and_in_order() {
    let agent = Agent::start().await;
    let rootfs = agent.rootfs("big");
    const LAST: u32 = 1_400_000;
    agent
        .run("big", &spec(&rootfs, &["seq", "1", &LAST.to_string()]))
        .await;
    let out = agent.read_all("big", false).await;
    let mut expected = String::with_capacity(11 << 20);
    for i in 1..=LAST {
        expected.push_str(&i.to_string());
        expected.push('\n');
    }
    assert!(expected.len() > 10_000_000);
    assert_eq!(out.len(), expected.len());
    assert!(
        out == expected.as_bytes(),
        "stdout differs from seq's output"
    );
    assert_eq!(agent.wait("big").await.unwrap().exit_status, 0);

    // And raw bytes: 10 MiB of zeros through dd.
    let rootfs = agent.rootfs("dd");
    agent
        .run(
            "dd",
            &spec(&rootfs, &["dd", "if=/dev/zero", "bs=1M", "count=10"]),
        )
        .await;
    let out = agent.read_all("dd", false).await;
    assert_eq!(out.len(), 10 << 20);
    assert!(out.iter().all(|&b| b == 0));
    assert_eq!(agent.wait("dd").await.unwrap().exit_status, 0);
    agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn root_env_cwd_user_and_hostname_follow_the_spec() {
    let agent = Agent::start().await;
    let rootfs = agent.rootfs("ident");
    let mut spec = spec(
        &rootfs,
        &[
            "sh",
            "-c",
            "env; echo cwd=$(pwd); id; echo host=$(hostname); \
             echo modes=$(stat -c %a /work/dir) $(stat -c %a /dev/null)",
        ],
    );
    spec["process"]["env"] = json!(["PATH=/bin", "FOO=bar baz"]);
    spec["process"]["cwd"] = json!("/work/dir");
    spec["process"]["user"] = json!({"uid": 1000, "gid": 1001, "additionalGids": [10, 20]});
    spec["hostname"] = json!("husk-test");
    let (out, err, status) = agent.run_to_end("ident", &spec).await;
    assert_eq!(status.exit_status, 0, "stderr: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines.contains(&"FOO=bar baz"), "{out}");
    assert!(lines.contains(&"PATH=/bin"), "{out}");
    assert!(
        !out.contains("HUSK_LOG"),
        "the agent's environment leaked: {out}"
    );
    assert!(lines.contains(&"cwd=/work/dir"), "{out}");
    assert!(lines.contains(&"host=husk-test"), "{out}");
    // The working directory is created 0755; devices keep their mode.
    assert!(lines.contains(&"modes=755 666"), "{out}");
    let id = lines
        .iter()
        .find(|l| l.starts_with("uid="))
        .expect("id output");
    assert!(id.starts_with("uid=1000 gid=1001"), "{id}");
    assert!(
        id.contains("groups=10,20") || id.contains("groups=10,20,"),
        "{id}"
    );
    agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn root_bad_spec_json_is_invalid_argument_and_the_agent_lives_on() {
    let agent = Agent::start().await;
    let error = agent
        .create_raw("bad", b"{this is not json".to_vec())
        .await
        .unwrap_err();
    let (code, message) = status_of(error);
    assert_eq!(code, Code::INVALID_ARGUMENT);
    assert!(message.contains("not valid runtime-spec JSON"), "{message}");

    let rootfs = agent.rootfs("bad");
    let mut no_args = spec(&rootfs, &[]);
    no_args["process"]["args"] = json!([]);
    let (code, message) = status_of(agent.create("bad", &no_args).await.unwrap_err());
    assert_eq!(code, Code::INVALID_ARGUMENT);
    assert!(message.contains("process.args"), "{message}");

    let mut wrong_root = spec(&rootfs, &["true"]);
    wrong_root["root"]["path"] = json!("/nonexistent/husk/rootfs");
    let (code, message) = status_of(agent.create("bad", &wrong_root).await.unwrap_err());
    assert_eq!(code, Code::INVALID_ARGUMENT);
    assert!(message.contains("/nonexistent/husk/rootfs"), "{message}");

    // The id was not taken by the failures, and the agent still works.
    let (out, _, status) = agent
        .run_to_end("bad", &spec(&rootfs, &["echo", "alive"]))
        .await;
    assert_eq!((out.as_str(), status.exit_status), ("alive\n", 0));
    agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn root_unknown_container_is_not_found() {
    let agent = Agent::start().await;
    let container = ContainerRequest {
        container_id: "nope".into(),
        ..Default::default()
    };
    let errors = vec![
        agent.wait("nope").await.unwrap_err(),
        agent.start_container("nope").await.unwrap_err(),
        agent
            .client
            .remove_container(ctx(), &container)
            .await
            .unwrap_err(),
        agent
            .client
            .close_stdin(ctx(), &process("nope"))
            .await
            .unwrap_err(),
        agent
            .client
            .read_stdout(
                ctx(),
                &ReadStreamRequest {
                    container_id: "nope".into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap_err(),
        agent
            .client
            .signal_process(
                ctx(),
                &SignalProcessRequest {
                    container_id: "nope".into(),
                    signal: 9,
                    ..Default::default()
                },
            )
            .await
            .unwrap_err(),
    ];
    for error in errors {
        let (code, message) = status_of(error);
        assert_eq!(code, Code::NOT_FOUND, "{message}");
        assert!(message.contains("\"nope\""), "{message}");
    }
    agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn root_missing_binary_is_a_clear_error() {
    let agent = Agent::start().await;
    let rootfs = agent.rootfs("missing");
    let error = agent
        .create("missing", &spec(&rootfs, &["nosuchcmd", "arg"]))
        .await
        .unwrap_err();
    let (code, message) = status_of(error);
    assert_eq!(code, Code::INVALID_ARGUMENT);
    assert!(
        message.contains("exec \"nosuchcmd\": no such file or directory in the container's PATH"),
        "{message}"
    );
    let error = agent
        .create("missing", &spec(&rootfs, &["/bin/nope"]))
        .await
        .unwrap_err();
    let (_, message) = status_of(error);
    assert!(message.contains("\"/bin/nope\""), "{message}");
    // The failed container is gone.
    let (code, _) = status_of(agent.wait("missing").await.unwrap_err());
    assert_eq!(code, Code::NOT_FOUND);
    agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn root_terminal_process_sees_a_tty() {
    let agent = Agent::start().await;
    let rootfs = agent.rootfs("tty");
    let mut spec = spec(
        &rootfs,
        &[
            "sh",
            "-c",
            "test -t 0 && test -t 1 && echo is-a-tty; stty size; t=$(tty); echo tty=$t; \
             echo console=$(stat -c %t:%T /dev/console) pty=$(stat -c %t:%T $t); \
             echo owner=$(stat -c %u $t); ls /dev/pts",
        ],
    );
    spec["process"]["terminal"] = json!(true);
    spec["process"]["consoleSize"] = json!({"height": 33, "width": 101});
    spec["process"]["user"] = json!({"uid": 1000, "gid": 1000});
    let (out, err, status) = agent.run_to_end("tty", &spec).await;
    assert_eq!(status.exit_status, 0, "{out}");
    assert_eq!(err, "", "stderr of a terminal process is empty");
    assert!(out.contains("is-a-tty"), "{out:?}");
    assert!(out.contains("33 101"), "{out:?}");
    // The terminal is in the container's own devpts, so it has a name there.
    let tty = support::line_value(&out, "tty").unwrap_or_default();
    assert!(support::is_pts_name(tty), "tty printed {tty:?}: {out:?}");
    // /dev/console is that terminal, and the process's user owns it.
    let devices = support::line_value(&out, "console").unwrap_or_default();
    let (console, pty) = devices
        .split_once(" pty=")
        .unwrap_or_else(|| panic!("no device numbers: {out:?}"));
    assert!(!pty.is_empty() && console == pty, "{out:?}");
    assert_eq!(support::line_value(&out, "owner"), Some("1000"), "{out:?}");
    agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn root_terminal_failures_leave_nothing() {
    let agent = Agent::start().await;
    let rootfs = agent.rootfs("ttyfail");
    // No devpts in the container: there is no /dev/ptmx to take a terminal
    // from (runc fails the same way).
    let mut spec = spec(&rootfs, &["true"]);
    spec["process"]["terminal"] = json!(true);
    spec["mounts"]
        .as_array_mut()
        .unwrap()
        .retain(|m| m["destination"] != "/dev/pts");
    let (_, message) = status_of(agent.create("ttyfail", &spec).await.unwrap_err());
    assert!(
        message.contains("opening /dev/ptmx in the container") && message.contains("devpts"),
        "{message}"
    );
    let (code, _) = status_of(agent.wait("ttyfail").await.unwrap_err());
    assert_eq!(code, Code::NOT_FOUND);
    // A failure after the terminal was sent: the missing program.
    let mut spec = support::spec(&rootfs, &["nosuchcmd"]);
    spec["process"]["terminal"] = json!(true);
    let (code, message) = status_of(agent.create("ttyfail", &spec).await.unwrap_err());
    assert_eq!(code, Code::INVALID_ARGUMENT, "{message}");
    assert!(message.contains("\"nosuchcmd\""), "{message}");
    // The id is free again and a terminal container works.
    spec["process"]["args"] = json!(["sh", "-c", "tty"]);
    let (out, _, status) = agent.run_to_end("ttyfail", &spec).await;
    assert_eq!(status.exit_status, 0, "{out}");
    assert!(support::is_pts_name(out.trim_end()), "{out:?}");
    agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn root_terminal_input_is_echoed_and_read() {
    let agent = Agent::start().await;
    let rootfs = agent.rootfs("ttyin");
    let mut spec = spec(&rootfs, &["sh", "-c", "read line; echo got=$line"]);
    spec["process"]["terminal"] = json!(true);
    agent.run("ttyin", &spec).await;
    agent
        .client
        .write_stdin(
            ctx(),
            &WriteStreamRequest {
                container_id: "ttyin".into(),
                data: b"abc\r".to_vec(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let out = String::from_utf8(agent.read_all("ttyin", false).await).unwrap();
    assert!(out.contains("got=abc"), "{out:?}");
    assert_eq!(agent.wait("ttyin").await.unwrap().exit_status, 0);
    agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn root_lifecycle_errors() {
    let agent = Agent::start().await;
    let rootfs = agent.rootfs("life");
    let spec = spec(&rootfs, &["sleep", "1000"]);
    agent.create("life", &spec).await.unwrap();
    let (code, message) = status_of(agent.create("life", &spec).await.unwrap_err());
    assert_eq!(code, Code::ALREADY_EXISTS, "{message}");
    agent.start_container("life").await.unwrap();
    let (code, _) = status_of(agent.start_container("life").await.unwrap_err());
    assert_eq!(code, Code::FAILED_PRECONDITION);
    let (code, _) = status_of(
        agent
            .create_raw("bad id", b"{}".to_vec())
            .await
            .unwrap_err(),
    );
    assert_eq!(code, Code::INVALID_ARGUMENT);

    // Remove kills a running container; the id is free again afterwards.
    let request = ContainerRequest {
        container_id: "life".into(),
        ..Default::default()
    };
    agent
        .client
        .remove_container(ctx(), &request)
        .await
        .unwrap();
    let (code, _) = status_of(agent.wait("life").await.unwrap_err());
    assert_eq!(code, Code::NOT_FOUND);

    // A created, never started container can be removed too.
    agent.create("life", &spec).await.unwrap();
    agent
        .client
        .remove_container(ctx(), &request)
        .await
        .unwrap();
    agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn root_wait_blocks_until_exit() {
    let agent = Agent::start().await;
    let rootfs = agent.rootfs("wait");
    agent
        .create("wait", &spec(&rootfs, &["cat"]))
        .await
        .unwrap();
    // Waiting before start and while running both block.
    let request = process("wait");
    let early = agent.client.wait_process(ctx(), &request);
    let blocked = tokio::time::timeout(Duration::from_millis(200), early).await;
    assert!(
        blocked.is_err(),
        "WaitProcess returned before the process exited"
    );
    agent.start_container("wait").await.unwrap();
    let waiter = {
        let client = agent.client.clone();
        tokio::spawn(async move { client.wait_process(ctx(), &process("wait")).await })
    };
    agent
        .client
        .close_stdin(ctx(), &process("wait"))
        .await
        .unwrap();
    let status = waiter.await.unwrap().unwrap();
    assert_eq!(status.exit_status, 0);
    agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn root_mounts_and_readonly_rootfs() {
    let agent = Agent::start().await;
    let rootfs = agent.rootfs("ro");
    let shared = agent.dir.0.join("shared.txt");
    std::fs::write(&shared, "from the host\n").unwrap();
    let mut spec = spec(
        &rootfs,
        &[
            "sh",
            "-c",
            "cat /etc/shared.txt; touch /x 2>/dev/null && echo root-writable; \
             touch /etc/shared.txt 2>/dev/null && echo bind-writable; \
             touch /tmp/y && echo tmp-writable; ls /dev; cat /proc/1/cmdline; echo",
        ],
    );
    spec["root"]["readonly"] = json!(true);
    let mounts = spec["mounts"].as_array_mut().unwrap();
    mounts.push(json!({"destination": "/etc/shared.txt", "type": "bind",
                       "source": shared, "options": ["rbind", "ro"]}));
    mounts.push(
        json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                       "options": ["nosuid", "nodev"]}),
    );
    let (out, err, status) = agent.run_to_end("ro", &spec).await;
    assert_eq!(status.exit_status, 0, "{err}");
    let has_line = |line: &str| out.lines().any(|l| l == line);
    assert!(has_line("from the host"), "{out}");
    assert!(!has_line("root-writable"), "{out}");
    assert!(!has_line("bind-writable"), "{out}");
    assert!(has_line("tmp-writable"), "{out}");
    for dev in ["null", "zero", "urandom", "pts", "shm", "ptmx", "fd"] {
        assert!(out.lines().any(|l| l == dev), "/dev/{dev} missing: {out}");
    }
    // The container's program is PID 1 of its own PID namespace.
    assert!(out.contains("sh\0-c\0"), "{out:?}");
    agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn root_shutdown_ends_the_agent_and_its_containers() {
    let agent = Agent::start().await;
    let rootfs = agent.rootfs("shut");
    agent.run("shut", &spec(&rootfs, &["sleep", "1000"])).await;
    let children = support::children_of(agent.pid());
    assert!(!children.is_empty());
    agent
        .client
        .shutdown(ctx(), &Empty::default())
        .await
        .unwrap();
    agent.wait_exit(&children);
}

#[tokio::test(flavor = "multi_thread")]
async fn root_orphans_are_reaped() {
    let agent = Agent::start().await;
    let rootfs = agent.rootfs("orphans");
    let (_, _, status) = agent
        .run_to_end(
            "orphans",
            &spec(&rootfs, &["sh", "-c", "sleep 1000 & sleep 1000 & exit 5"]),
        )
        .await;
    assert_eq!(status.exit_status, 5);
    // The background sleeps die with their PID namespace and nothing stays
    // behind as a zombie of the agent.
    support::wait_until(
        Duration::from_secs(10),
        "the agent to have no children",
        || support::children_of(agent.pid()).is_empty(),
    );
    agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn root_many_containers_at_once() {
    let agent = std::sync::Arc::new(Agent::start().await);
    let mut tasks = Vec::new();
    for n in 0..6 {
        let agent = std::sync::Arc::clone(&agent);
        tasks.push(tokio::spawn(async move {
            let id = format!("many-{n}");
            let rootfs = agent.rootfs(&id);
            let script = format!("echo container {n}; exit {n}");
            let (out, _, status) = agent
                .run_to_end(&id, &spec(&rootfs, &["sh", "-c", &script]))
                .await;
            assert_eq!(out, format!("container {n}\n"));
            assert_eq!(status.exit_status, n);
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let agent = std::sync::Arc::into_inner(agent).unwrap();
    agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn root_killed_before_start_fails_start() {
    let agent = Agent::start().await;
    let rootfs = agent.rootfs("early");
    agent
        .create("early", &spec(&rootfs, &["echo", "never"]))
        .await
        .unwrap();
    let request = SignalProcessRequest {
        container_id: "early".into(),
        signal: 9,
        ..Default::default()
    };
    agent.client.signal_process(ctx(), &request).await.unwrap();
    let status = agent.wait("early").await.unwrap();
    assert_eq!((status.exit_status, status.signal), (137, 9));
    let (code, message) = status_of(agent.start_container("early").await.unwrap_err());
    assert_eq!(code, Code::INTERNAL, "{message}");
    assert!(message.contains("killed by signal 9"), "{message}");
    agent.stop();
}

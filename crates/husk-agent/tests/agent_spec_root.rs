//! The OCI spec inside the container: capabilities, no_new_privs, rlimits,
//! masked and read-only paths, sysctls, seccomp, user and cgroup
//! namespaces; and what of linux.resources this host can check (root).

mod support;

use husk_protocol::agent::{ContainerRequest, UpdateContainerRequest};
use serde_json::{json, Value};
use support::{ctx, spec, status_of, Agent, CgroupDir};
use ttrpc::Code;

/// Runs `script` in a fresh container of `spec` (changed by `edit`):
/// (stdout, stderr, exit status).
async fn run_script(
    agent: &Agent,
    id: &str,
    script: &str,
    edit: impl FnOnce(&mut Value),
) -> (String, String, i32) {
    let rootfs = agent.rootfs(id);
    let mut spec = spec(&rootfs, &["sh", "-c", script]);
    edit(&mut spec);
    let (out, err, status) = agent.run_to_end(id, &spec).await;
    (out, err, status.exit_status)
}

#[tokio::test(flavor = "multi_thread")]
async fn root_capabilities_bound_what_root_may_do() {
    let agent = Agent::start().await;
    let script = "grep -E '^Cap(Eff|Prm|Bnd|Amb|Inh)' /proc/self/status; \
                  touch /f; chown 5:5 /f && echo chown-ok || echo chown-refused";
    let (out, err, status) = run_script(&agent, "nochown", script, |s| {
        s["process"]["capabilities"] = json!({
            "bounding": ["CAP_KILL", "CAP_DAC_OVERRIDE"],
            "effective": ["CAP_KILL", "CAP_DAC_OVERRIDE"],
            "permitted": ["CAP_KILL", "CAP_DAC_OVERRIDE"]
        });
    })
    .await;
    assert_eq!(status, 0, "{err}");
    // CAP_DAC_OVERRIDE is 1, CAP_KILL 5.
    assert!(out.contains("CapEff:\t0000000000000022"), "{out}");
    assert!(out.contains("CapPrm:\t0000000000000022"), "{out}");
    assert!(out.contains("CapBnd:\t0000000000000022"), "{out}");
    assert!(out.contains("CapInh:\t0000000000000000"), "{out}");
    assert!(out.contains("chown-refused"), "{out}");

    let (out, _, _) = run_script(&agent, "chown", script, |s| {
        s["process"]["capabilities"] = json!({
            "bounding": ["CAP_CHOWN"], "effective": ["CAP_CHOWN"], "permitted": ["CAP_CHOWN"]
        });
    })
    .await;
    assert!(out.contains("chown-ok"), "{out}");

    // A non-root user with ambient capabilities keeps them across exec.
    let (out, err, _) = run_script(
        &agent,
        "ambient",
        "grep -E '^Cap(Eff|Amb)' /proc/self/status; id -u",
        |s| {
            s["process"]["user"] = json!({"uid": 1000, "gid": 1000});
            s["process"]["capabilities"] = json!({
                "bounding": ["CAP_NET_BIND_SERVICE"], "effective": ["CAP_NET_BIND_SERVICE"],
                "permitted": ["CAP_NET_BIND_SERVICE"], "inheritable": ["CAP_NET_BIND_SERVICE"],
                "ambient": ["CAP_NET_BIND_SERVICE"]
            });
        },
    )
    .await;
    assert!(out.contains("CapAmb:\t0000000000000400"), "{out} {err}");
    assert!(out.contains("CapEff:\t0000000000000400"), "{out}");
    assert!(out.contains("1000"), "{out}");
    agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn root_no_new_privs_rlimits_and_oom_score() {
    let agent = Agent::start().await;
    let script =
        "grep NoNewPrivs /proc/self/status; ulimit -n; ulimit -Hn; cat /proc/self/oom_score_adj";
    let (out, err, status) = run_script(&agent, "nnp", script, |s| {
        s["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "soft": 321, "hard": 654}]);
        s["process"]["oomScoreAdj"] = json!(123);
    })
    .await;
    assert_eq!(status, 0, "{err}");
    assert_eq!(out, "NoNewPrivs:\t1\n321\n654\n123\n");
    let (out, _, _) = run_script(&agent, "privs", "grep NoNewPrivs /proc/self/status", |s| {
        s["process"]["noNewPrivileges"] = json!(false);
    })
    .await;
    assert_eq!(out, "NoNewPrivs:\t0\n");
    agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn root_masked_readonly_paths_and_sysctl() {
    let agent = Agent::start().await;
    let script =
        "echo kcore=$(cat /proc/kcore | wc -c); echo firmware=$(ls /sys/firmware | wc -l); \
                  echo 1 > /proc/sys/kernel/ns_last_pid 2>/dev/null && echo sys-writable; \
                  cat /proc/sys/kernel/msgmax; \
                  ls -l /dev/fd /dev/stdin /dev/ptmx | tr -s ' ' | cut -d' ' -f9-; \
                  mount | grep -E ' /dev/(shm|mqueue|pts) ' | cut -d' ' -f3,5";
    let (out, err, status) = run_script(&agent, "masked", script, |s| {
        s["linux"]["sysctl"] = json!({"kernel.msgmax": "4321"});
        s["process"]["capabilities"] = json!({
            "bounding": ["CAP_SYS_ADMIN"], "effective": ["CAP_SYS_ADMIN"], "permitted": ["CAP_SYS_ADMIN"]
        });
    })
    .await;
    assert_eq!(status, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines.contains(&"kcore=0"), "{out}");
    assert!(lines.contains(&"firmware=0"), "{out}");
    assert!(!lines.contains(&"sys-writable"), "{out}");
    assert!(lines.contains(&"4321"), "{out}");
    assert!(lines.contains(&"/dev/fd -> /proc/self/fd"), "{out}");
    assert!(lines.contains(&"/dev/stdin -> /proc/self/fd/0"), "{out}");
    assert!(lines.contains(&"/dev/ptmx -> pts/ptmx"), "{out}");
    for mount in ["/dev/shm tmpfs", "/dev/mqueue mqueue", "/dev/pts devpts"] {
        assert!(lines.contains(&mount), "{mount} missing: {out}");
    }
    agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn root_seccomp_errno_ret_and_the_podman_profile() {
    let agent = Agent::start().await;
    let (out, err, status) = run_script(&agent, "sec", "mkdir /x; echo status=$?; ls / >/dev/null && echo ls-ok", |s| {
        s["linux"]["seccomp"] = json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}]
        });
    })
    .await;
    assert_eq!(status, 0, "{err}");
    assert!(err.contains("Function not implemented"), "{err}");
    assert_eq!(out, "status=1\nls-ok\n");

    // The profile podman generates: normal programs work; what it leaves
    // out (here: unshare, removed from the allow list) fails.
    let mut profile: Value =
        serde_json::from_str(include_str!("../src/seccomp/testdata/podman-default.json")).unwrap();
    for entry in profile["syscalls"].as_array_mut().unwrap() {
        if let Some(names) = entry["names"].as_array_mut() {
            names.retain(|n| n != "unshare");
        }
    }
    let script =
        "echo hello; ls /bin | wc -l; unshare -U true && echo unshared || echo unshare-refused";
    for no_new_privs in [true, false] {
        let id = format!("podman-{no_new_privs}");
        let (out, err, status) = run_script(&agent, &id, script, |s| {
            s["linux"]["seccomp"] = profile.clone();
            s["process"]["noNewPrivileges"] = json!(no_new_privs);
        })
        .await;
        assert_eq!(status, 0, "{err}");
        assert!(out.starts_with("hello\n"), "{out}");
        assert!(out.contains("unshare-refused"), "{out} {err}");
        assert!(err.contains("Function not implemented"), "{err}");
    }
    // A kill action kills.
    let (_, _, status) = run_script(&agent, "seckill", "mkdir /y", |s| {
        s["linux"]["seccomp"] = json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_KILL_PROCESS"}]
        });
    })
    .await;
    assert_eq!(status, 128 + 31, "killed by SIGSYS");
    // SCMP_ACT_NOTIFY cannot be had.
    let rootfs = agent.rootfs("notify");
    let mut notify = spec(&rootfs, &["true"]);
    notify["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_NOTIFY"});
    let (code, message) = status_of(agent.create("notify", &notify).await.unwrap_err());
    assert_eq!(code, Code::INVALID_ARGUMENT);
    assert!(message.contains("SCMP_ACT_NOTIFY"), "{message}");
    agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn root_user_namespace_maps_ids() {
    let agent = Agent::start().await;
    let rootfs = agent.rootfs("userns");
    // The rootfs belongs to the container's root, as podman arranges it.
    let status = std::process::Command::new("chown")
        .args(["-R", "-h", "100000:100000"])
        .arg(&rootfs)
        .status()
        .unwrap();
    assert!(status.success());
    let mut spec = spec(
        &rootfs,
        &["sh", "-c", "cat /proc/self/uid_map /proc/self/gid_map; id -u; id -g; hostname; touch /owned && echo write-ok"],
    );
    spec["linux"]["namespaces"] = json!([
        {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "user"}
    ]);
    spec["linux"]["uidMappings"] = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
    spec["linux"]["gidMappings"] = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
    spec["process"]["capabilities"] = json!({
        "bounding": ["CAP_CHOWN", "CAP_DAC_OVERRIDE"], "effective": ["CAP_CHOWN", "CAP_DAC_OVERRIDE"],
        "permitted": ["CAP_CHOWN", "CAP_DAC_OVERRIDE"]
    });
    let (out, err, status) = agent.run_to_end("userns", &spec).await;
    assert_eq!(status.exit_status, 0, "{err}");
    let lines: Vec<String> = out
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(
        lines,
        vec![
            "0 100000 65536",
            "0 100000 65536",
            "0",
            "0",
            "husk",
            "write-ok"
        ],
        "{err}"
    );
    // The file was created by the mapped root.
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(rootfs.join("owned")).unwrap().uid(),
        100000
    );
    agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn root_cgroup_namespace_and_stats() {
    let cgroups = CgroupDir::new("spec");
    let agent = Agent::with_cgroups(&cgroups).await;
    let rootfs = agent.rootfs("cgns");
    let mut spec = spec(
        &rootfs,
        &["sh", "-c", "cat /proc/self/cgroup; i=0; while [ $i -lt 30000 ]; do i=$((i+1)); done; echo done; sleep 1000"],
    );
    spec["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "cgroup"}));
    agent.run("cgns", &spec).await;
    let mut out = Vec::new();
    while !String::from_utf8_lossy(&out).contains("done") {
        let chunk = agent
            .client
            .read_stdout(
                ctx(),
                &husk_protocol::agent::ReadStreamRequest {
                    container_id: "cgns".into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap()
            .data;
        assert!(!chunk.is_empty());
        out.extend(chunk);
    }
    // The container's cgroup is the root of its cgroup namespace (on a
    // hybrid host the v1 hierarchies are listed too).
    let out = String::from_utf8_lossy(&out).into_owned();
    assert!(out.lines().any(|l| l == "0::/"), "{out}");
    let request = ContainerRequest {
        container_id: "cgns".into(),
        ..Default::default()
    };
    let stats = agent.client.stats_container(ctx(), &request).await.unwrap();
    assert!(stats.cpu_usage_usec > 0, "{stats:?}");
    if cgroups.has_controller("memory") {
        assert!(stats.memory_usage > 0, "{stats:?}");
    }
    agent.remove("cgns").await.unwrap();
    agent.stop();
}

/// Limits need the controllers; where this host lacks them (a hybrid v1
/// host) the agent must refuse clearly rather than run unlimited.
#[tokio::test(flavor = "multi_thread")]
async fn root_resources_are_applied_or_refused() {
    let cgroups = CgroupDir::new("limits");
    let agent = Agent::with_cgroups(&cgroups).await;
    let rootfs = agent.rootfs("limits");
    let mut spec = spec(&rootfs, &["sleep", "1000"]);
    spec["linux"]["resources"] = json!({
        "memory": {"limit": 33554432},
        "pids": {"limit": 20}
    });
    let created = agent.create("limits", &spec).await;
    if cgroups.has_controller("memory") && cgroups.has_controller("pids") {
        created.unwrap();
        let dir = cgroups.0.join("limits");
        assert_eq!(
            std::fs::read_to_string(dir.join("memory.max")).unwrap(),
            "33554432\n"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("pids.max")).unwrap(),
            "20\n"
        );
        let request = UpdateContainerRequest {
            container_id: "limits".into(),
            resources_json: br#"{"memory": {"limit": 67108864}}"#.to_vec(),
            ..Default::default()
        };
        agent
            .client
            .update_container(ctx(), &request)
            .await
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("memory.max")).unwrap(),
            "67108864\n"
        );
        agent.remove("limits").await.unwrap();
    } else {
        let (code, message) = status_of(created.unwrap_err());
        assert_eq!(code, Code::FAILED_PRECONDITION, "{message}");
        assert!(
            message.contains("memory.limit needs memory.max"),
            "{message}"
        );
        assert!(
            !cgroups.0.join("limits").exists(),
            "the cgroup was left behind"
        );
        // Without limits the container runs, and an update that needs a
        // missing controller is refused the same way.
        spec["linux"]["resources"] = json!({"devices": [{"allow": false, "access": "rwm"}]});
        agent.run("limits", &spec).await;
        let request = UpdateContainerRequest {
            container_id: "limits".into(),
            resources_json: br#"{"pids": {"limit": 10}}"#.to_vec(),
            ..Default::default()
        };
        let (code, message) = status_of(
            agent
                .client
                .update_container(ctx(), &request)
                .await
                .unwrap_err(),
        );
        assert_eq!(code, Code::FAILED_PRECONDITION, "{message}");
        let bad = UpdateContainerRequest {
            resources_json: br#"{"memory": "lots"}"#.to_vec(),
            ..request.clone()
        };
        let (code, _) = status_of(
            agent
                .client
                .update_container(ctx(), &bad)
                .await
                .unwrap_err(),
        );
        assert_eq!(code, Code::INVALID_ARGUMENT);
        agent.remove("limits").await.unwrap();
    }
    agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn root_update_and_stats_without_cgroups_are_refused() {
    let agent = Agent::start().await;
    let rootfs = agent.rootfs("nocg");
    agent.run("nocg", &spec(&rootfs, &["sleep", "1000"])).await;
    let request = ContainerRequest {
        container_id: "nocg".into(),
        ..Default::default()
    };
    let (code, message) = status_of(
        agent
            .client
            .stats_container(ctx(), &request)
            .await
            .unwrap_err(),
    );
    assert_eq!(code, Code::FAILED_PRECONDITION);
    assert!(message.contains("--cgroup-root"), "{message}");
    agent.stop();
}

/// An exec joins the container's user namespace and gets its seccomp filter
/// and the capabilities of its own process object.
#[tokio::test(flavor = "multi_thread")]
async fn root_exec_in_a_user_namespace_with_seccomp() {
    let agent = Agent::start().await;
    let rootfs = agent.rootfs("execns");
    let status = std::process::Command::new("chown")
        .args(["-R", "-h", "200000:200000"])
        .arg(&rootfs)
        .status()
        .unwrap();
    assert!(status.success());
    let mut spec = spec(&rootfs, &["sleep", "1000"]);
    spec["linux"]["namespaces"] = json!([
        {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "user"}
    ]);
    spec["linux"]["uidMappings"] = json!([{"containerID": 0, "hostID": 200000, "size": 65536}]);
    spec["linux"]["gidMappings"] = json!([{"containerID": 0, "hostID": 200000, "size": 65536}]);
    spec["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}]
    });
    agent.run("execns", &spec).await;
    let mut process = support::exec_process(&[
        "sh",
        "-c",
        "cat /proc/self/uid_map; id -u; grep -E '^(CapEff|NoNewPrivs)' /proc/self/status; mkdir /z",
    ]);
    process["capabilities"] =
        json!({"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"], "permitted": ["CAP_KILL"]});
    process["noNewPrivileges"] = json!(true);
    let (out, err, status) = agent.exec_to_end("execns", "ex", &process).await;
    let lines: Vec<String> = out
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(
        lines,
        vec![
            "0 200000 65536",
            "0",
            "CapEff: 0000000000000020",
            "NoNewPrivs: 1"
        ],
        "{err}"
    );
    assert!(err.contains("Function not implemented"), "{err}");
    assert_eq!(status.exit_status, 1);
    agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn root_terminals_in_a_user_namespace() {
    let agent = Agent::start().await;
    let rootfs = agent.rootfs("ttyns");
    let status = std::process::Command::new("chown")
        .args(["-R", "-h", "300000:300000"])
        .arg(&rootfs)
        .status()
        .unwrap();
    assert!(status.success());
    let userns = |args: &[&str]| {
        let mut spec = spec(&rootfs, args);
        spec["linux"]["namespaces"] = json!([
            {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "user"}
        ]);
        spec["linux"]["uidMappings"] = json!([{"containerID": 0, "hostID": 300000, "size": 65536}]);
        spec["linux"]["gidMappings"] = json!([{"containerID": 0, "hostID": 300000, "size": 65536}]);
        spec
    };
    // The init's terminal: from the devpts the container mounted in its
    // user namespace, owned by its (mapped) root.
    let mut spec = userns(&["sh", "-c", "t=$(tty); echo tty=$t owner=$(stat -c %u $t)"]);
    spec["process"]["terminal"] = json!(true);
    let (out, _, status) = agent.run_to_end("ttyns", &spec).await;
    assert_eq!(status.exit_status, 0, "{out}");
    let line = support::line_value(&out, "tty").unwrap_or_default();
    let (tty, owner) = line.split_once(" owner=").unwrap_or((line, ""));
    assert!(support::is_pts_name(tty), "{out:?}");
    assert_eq!(owner, "0", "{out:?}");
    // An exec's terminal in a container without one.
    agent.run("ttyns2", &userns(&["sleep", "1000"])).await;
    // As uid 1000 of the namespace: the exec stage became the namespace's
    // root before it opened the terminal, so it can give it to the user.
    let mut process =
        support::exec_process(&["sh", "-c", "t=$(tty); echo tty=$t owner=$(stat -c %u $t)"]);
    process["terminal"] = json!(true);
    process["user"] = json!({"uid": 1000, "gid": 1000});
    let (out, _, status) = agent.exec_to_end("ttyns2", "t", &process).await;
    assert_eq!(status.exit_status, 0, "{out}");
    let line = support::line_value(&out, "tty").unwrap_or_default();
    let (tty, owner) = line.split_once(" owner=").unwrap_or((line, ""));
    assert!(support::is_pts_name(tty), "{out:?}");
    assert_eq!(owner, "1000", "{out:?}");
    agent.stop();
}

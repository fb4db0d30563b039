//! Network, IPC, UTS and PID namespaces (root): a container with a network
//! namespace of its own has `lo` up with 127.0.0.1, as under runc, and a pod
//! member whose namespace paths name its sandbox container
//! (`husk_protocol::CONTAINER_NS_PREFIX`) shares that container's network,
//! IPC and UTS namespaces, and its PID namespace when the PID entry names
//! it too (CRI's `NamespaceOption.pid = POD`). Only namespaces the agent
//! makes for the test are touched; never the host's.

mod support;

use serde_json::json;
use support::{exec_process, spec, Agent};

/// The netns of this process (the host's, where the agent runs here).
fn own_netns() -> String {
    std::fs::read_link("/proc/self/ns/net")
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn root_a_new_network_namespace_has_loopback_up() {
    let agent = Agent::start().await;
    let rootfs = agent.rootfs("lo");
    // A server on 127.0.0.1 and a client in the same container.
    let script = "ip addr show lo; readlink /proc/self/ns/net; \
                  echo pong | nc -l -p 8080 > /tmp/got & \
                  for i in $(seq 100); do \
                    out=$(echo ping | nc 127.0.0.1 8080) && [ -n \"$out\" ] && break; sleep 0.05; \
                  done; echo \"client got $out\"; wait; echo \"server got $(cat /tmp/got)\"";
    let s = spec(&rootfs, &["sh", "-c", script]);
    let (out, err, status) = agent.run_to_end("lo", &s).await;
    assert_eq!(status.exit_status, 0, "{out}\n{err}");
    let lo = out.lines().next().unwrap_or_default();
    assert!(lo.contains("<LOOPBACK,UP,LOWER_UP>"), "lo is not up: {out}");
    assert!(out.contains("inet 127.0.0.1/8"), "{out}");
    assert!(
        !out.contains(&own_netns()),
        "the container shares the host's netns: {out}"
    );
    assert!(out.contains("client got pong"), "{out}\n{err}");
    assert!(out.contains("server got ping"), "{out}\n{err}");
    agent.remove("lo").await.unwrap();
    agent.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn root_a_pod_member_joins_its_sandbox_namespaces() {
    let agent = Agent::start().await;
    let pod = format!("{}sbx", husk_protocol::CONTAINER_NS_PREFIX);

    let mut sandbox = spec(&agent.rootfs("sbx"), &["sleep", "1000"]);
    sandbox["hostname"] = json!("podhost");
    agent.run("sbx", &sandbox).await;
    let links = "readlink /proc/self/ns/net /proc/self/ns/ipc /proc/self/ns/uts; hostname";
    let (theirs, err, status) = agent
        .exec_to_end("sbx", "links", &exec_process(&["sh", "-c", links]))
        .await;
    assert_eq!(status.exit_status, 0, "{err}");
    assert!(theirs.contains("podhost"), "{theirs}");
    assert!(!theirs.contains(&own_netns()), "{theirs}");

    // The member names its pod's namespaces (as the host writes them for a
    // CRI container) and sets no hostname of its own.
    let mut member = spec(&agent.rootfs("app"), &["sh", "-c", links]);
    member.as_object_mut().unwrap().remove("hostname");
    member["linux"]["namespaces"] = json!([
        {"type": "pid"}, {"type": "mount"},
        {"type": "network", "path": pod},
        {"type": "ipc", "path": pod},
        {"type": "uts", "path": pod},
    ]);
    let (ours, err, status) = agent.run_to_end("app", &member).await;
    assert_eq!(status.exit_status, 0, "{err}");
    assert_eq!(ours, theirs, "the member has namespaces of its own");

    // A member of a pod that has no such container is refused, clearly.
    let mut lost = member.clone();
    lost["linux"]["namespaces"][2]["path"] =
        json!(format!("{}nosuch", husk_protocol::CONTAINER_NS_PREFIX));
    let e = agent.create("lost", &lost).await.unwrap_err();
    assert!(
        format!("{e:?}").contains("joins the net namespace of container \\\"nosuch\\\""),
        "{e:?}"
    );

    agent.remove("app").await.unwrap();
    agent.remove("sbx").await.unwrap();
    agent.stop();
}

/// The PID namespace of this process (the host's, where the agent runs here).
fn own_pidns() -> String {
    std::fs::read_link("/proc/self/ns/pid")
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn root_a_pod_member_shares_its_sandbox_pid_namespace_when_asked() {
    let agent = Agent::start().await;
    let pod = format!("{}sbx", husk_protocol::CONTAINER_NS_PREFIX);
    agent
        .run("sbx", &spec(&agent.rootfs("sbx"), &["sleep", "424242"]))
        .await;
    let look = "readlink /proc/self/ns/pid; ps -o pid,args";
    let (theirs, err, status) = agent
        .exec_to_end("sbx", "look", &exec_process(&["sh", "-c", look]))
        .await;
    assert_eq!(status.exit_status, 0, "{err}");
    let sandbox_ns = theirs.lines().next().unwrap_or_default().to_string();
    assert!(
        sandbox_ns.starts_with("pid:[") && sandbox_ns != own_pidns(),
        "{theirs}"
    );

    // pid = POD: the member's PID entry names its sandbox container.
    let member = |rootfs: &std::path::Path, pid: serde_json::Value| {
        let mut s = spec(rootfs, &["sleep", "100000"]);
        s["linux"]["namespaces"] = json!([
            pid, {"type": "mount"},
            {"type": "network", "path": pod},
            {"type": "ipc", "path": pod},
            {"type": "uts", "path": pod},
        ]);
        s
    };
    let shared = member(&agent.rootfs("app"), json!({"type": "pid", "path": pod}));
    agent.run("app", &shared).await;
    // Its init and its execs are in the sandbox's PID namespace, and see
    // the sandbox's init as pid 1.
    let (ours, err, status) = agent
        .exec_to_end("app", "look", &exec_process(&["sh", "-c", look]))
        .await;
    assert_eq!(status.exit_status, 0, "{err}");
    assert_eq!(ours.lines().next(), Some(sandbox_ns.as_str()), "{ours}");
    assert!(
        ours.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["1", "sleep", "424242"]),
        "the member does not see the sandbox's init as pid 1:\n{ours}"
    );
    assert!(ours.contains("sleep 100000"), "{ours}");
    // The sandbox sees the member too.
    let (theirs, err, status) = agent
        .exec_to_end("sbx", "look2", &exec_process(&["sh", "-c", look]))
        .await;
    assert_eq!(status.exit_status, 0, "{err}");
    assert!(theirs.contains("sleep 100000"), "{theirs}");

    // Every thread of the agent still clones into its own PID namespace.
    let tasks = std::fs::read_dir(format!("/proc/{}/task", agent.pid())).unwrap();
    for task in tasks.flatten() {
        let ns = std::fs::read_link(task.path().join("ns/pid_for_children")).unwrap();
        assert_eq!(
            ns.to_string_lossy(),
            own_pidns(),
            "agent thread {:?} was left in another PID namespace",
            task.file_name()
        );
    }

    // pid = CONTAINER: a PID namespace of its own, where the sandbox's
    // processes are not seen.
    let own = member(&agent.rootfs("solo"), json!({"type": "pid"}));
    agent.run("solo", &own).await;
    let (solo, err, status) = agent
        .exec_to_end("solo", "look", &exec_process(&["sh", "-c", look]))
        .await;
    assert_eq!(status.exit_status, 0, "{err}");
    assert_ne!(solo.lines().next(), Some(sandbox_ns.as_str()), "{solo}");
    assert!(!solo.contains("424242"), "{solo}");

    for id in ["solo", "app", "sbx"] {
        agent.remove(id).await.unwrap();
    }
    agent.stop();
}

//! Kubernetes pods on husk through containerd's CRI, driven as kubelet
//! drives it (`husk_e2e::cri`): RunPodSandbox with the `husk` handler, one
//! VM per pod, the CRI surface (ExecSync, logs, stats, updates), pod
//! networking over a CNI bridge, OOM kills, and nothing left after
//! StopPodSandbox / RemovePodSandbox.

use std::time::{Duration, Instant};

use husk_e2e::cri::{self, Cri, SUBNET_PREFIX};
use husk_e2e::{guest_release, wait_until, LeakGuard};
use k8s_cri::v1 as api;

/// The container's memory limit, from its own guest cgroup (at the root of
/// /sys/fs/cgroup with a cgroup namespace, below it without).
const MEMORY_MAX: &str = "cat /sys/fs/cgroup$(sed -n 's/^0:://p' /proc/self/cgroup)/memory.max";

/// A shell loop fetching `/passwd` from busybox httpd at `addr` (its
/// `-h /etc`), retried while the server comes up.
fn fetch_passwd(addr: &str) -> String {
    format!(
        "for i in $(seq 50); do \
           printf 'GET /passwd HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {addr} 8080 && exit 0; \
           sleep 0.2; \
         done; exit 1"
    )
}

/// Two running containers: `srv` (busybox httpd on `listen`, serving /etc)
/// in `srv_pod`, and `cli` (sleeping) in `cli_pod`.
fn server_and_client(
    c: &Cri,
    srv_pod: (&str, &api::PodSandboxConfig),
    listen: &str,
    cli_pod: (&str, &api::PodSandboxConfig),
) -> (String, String) {
    let srv = c.run_container(
        srv_pod.0,
        srv_pod.1,
        Cri::container_config("srv", &["httpd", "-f", "-p", listen, "-h", "/etc"]),
    );
    let cli = c.run_container(
        cli_pod.0,
        cli_pod.1,
        Cri::container_config("cli", &["sleep", "100000"]),
    );
    c.wait_state(&srv, api::ContainerState::ContainerRunning);
    c.wait_state(&cli, api::ContainerState::ContainerRunning);
    (srv, cli)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A pod READY with an IP of the bridge's subnet; a container RUNNING in
/// it; ExecSync's exit codes, separate stdout and stderr and timeout; the
/// guest kernel; the log file in CRI format; env; hostPath mounts (ro
/// enforced, rw written through to the host); the pod's hostname; stats;
/// UpdateContainerResources; one QEMU for the pod; and no shim, QEMU,
/// mount, veth, netns or cgroup once the pod is stopped and removed.
#[test]
fn cri_pod_runs_execs_logs_and_leaves_nothing() {
    let _leaks = LeakGuard::new();
    let c = Cri::start("pod");
    let pc = c.pod_config("web");
    let t0 = Instant::now();
    let pod = c.run_pod(&pc);
    let st = c.pod_status(&pod).status.expect("pod status");
    assert_eq!(
        st.state,
        api::PodSandboxState::SandboxReady as i32,
        "{st:?}"
    );
    let ip = st.network.map(|n| n.ip).unwrap_or_default();
    assert!(
        ip.starts_with(SUBNET_PREFIX),
        "pod IP {ip:?} not in the CNI subnet"
    );
    assert_eq!(c.qemus().len(), 1, "RunPodSandbox boots the pod's VM");
    // The idle pod's host memory (docs/kubernetes.md's pod overhead).
    let pss = c.pss_kib();
    let total: u64 = pss.iter().map(|(_, k)| k).sum();
    eprintln!("idle pod host PSS: {total} KiB ({pss:?})");
    // Restored from the VM template (the default), the pod's share is 9p:
    // no virtiofsd.
    assert!(
        pss.iter()
            .all(|(what, k)| (*k > 0) == (*what != "virtiofsd")),
        "{pss:?}"
    );

    let ro = c.dir.path().join("ro");
    let rw = c.dir.path().join("rw");
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::create_dir_all(&rw).unwrap();
    std::fs::write(ro.join("in"), "from-the-host\n").unwrap();
    let mut cc = Cri::container_config(
        "app",
        &[
            "sh",
            "-c",
            "echo \"hello $GREETING\"; echo to-stderr >&2; while sleep 1; do echo tick; done",
        ],
    );
    cc.envs = cri::envs(&[("GREETING", "from-cri")]);
    cc.mounts = vec![
        api::Mount {
            container_path: "/data-ro".into(),
            host_path: ro.to_string_lossy().into_owned(),
            readonly: true,
            ..Default::default()
        },
        api::Mount {
            container_path: "/data-rw".into(),
            host_path: rw.to_string_lossy().into_owned(),
            ..Default::default()
        },
    ];
    cc.linux.as_mut().unwrap().resources = Some(api::LinuxContainerResources {
        memory_limit_in_bytes: 96 << 20,
        ..Default::default()
    });
    let app = c.run_container(&pod, &pc, cc);
    let s = c.wait_state(&app, api::ContainerState::ContainerRunning);
    eprintln!("pod start to running container: {:?}", t0.elapsed());
    assert_eq!(c.qemus().len(), 1, "the container runs in the pod's VM");

    // ExecSync.
    assert_eq!(c.exec_ok(&app, &["uname", "-r"]).trim(), guest_release());
    let r = c.exec_sync(&app, &["sh", "-c", "exit 7"], 0).unwrap();
    assert_eq!(r.exit_code, 7);
    let r = c
        .exec_sync(&app, &["sh", "-c", "echo out; echo err >&2"], 0)
        .unwrap();
    assert_eq!(
        (text(&r.stdout), text(&r.stderr)),
        ("out\n".into(), "err\n".into())
    );
    let t = Instant::now();
    let r = c.exec_sync(&app, &["sleep", "60"], 2);
    assert!(
        t.elapsed() < Duration::from_secs(45),
        "ExecSync's 2 s timeout took {:?}",
        t.elapsed()
    );
    match r {
        Err(e) => assert!(e.message().contains("timeout"), "{}", e.message()),
        Ok(r) => panic!("ExecSync past its timeout answered {r:?}"),
    }
    // The container still serves execs after the timed-out one.
    assert_eq!(c.exec_ok(&app, &["echo", "again"]), "again\n");

    // Streaming Exec through containerd's streaming server.
    let url = c
        .ok(
            "Exec",
            c.runtime().exec(api::ExecRequest {
                container_id: app.clone(),
                cmd: ["sh", "-c", "echo streamed; echo err >&2; exit 3"]
                    .map(String::from)
                    .to_vec(),
                stdout: true,
                stderr: true,
                ..Default::default()
            }),
        )
        .url;
    let got = cri::stream(&c.netns, &url);
    let ch = |n: u8| text(got.get(&n).map_or(&[][..], |v| v.as_slice()));
    assert_eq!(
        (ch(1), ch(2)),
        ("streamed\n".into(), "err\n".into()),
        "{got:?}"
    );
    assert!(
        ch(3).contains("NonZeroExitCode") && ch(3).contains("\"3\""),
        "the exec's status: {}",
        ch(3)
    );

    // Streaming Attach to a container that speaks a few seconds after its
    // start, then exits: the stream carries its output and ends with it.
    let talker = c.run_container(
        &pod,
        &pc,
        Cri::container_config(
            "talker",
            &[
                "sh",
                "-c",
                "sleep 5; echo attached-out; echo attached-err >&2",
            ],
        ),
    );
    let url = c
        .ok(
            "Attach",
            c.runtime().attach(api::AttachRequest {
                container_id: talker.clone(),
                stdout: true,
                stderr: true,
                ..Default::default()
            }),
        )
        .url;
    let got = cri::stream(&c.netns, &url);
    let ch = |n: u8| text(got.get(&n).map_or(&[][..], |v| v.as_slice()));
    assert_eq!(
        (ch(1), ch(2)),
        ("attached-out\n".into(), "attached-err\n".into()),
        "{got:?}"
    );
    c.wait_state(&talker, api::ContainerState::ContainerExited);

    // The log, in CRI format, at the pod's log directory + log_path.
    assert_eq!(
        s.log_path,
        format!("{}/app.log", pc.log_directory),
        "log path"
    );
    let lines = c.wait_log(std::path::Path::new(&s.log_path), "to-stderr");
    assert!(
        lines.contains(&("stdout".into(), "F".into(), "hello from-cri".into())),
        "{lines:?}"
    );
    assert!(
        lines.contains(&("stderr".into(), "F".into(), "to-stderr".into())),
        "{lines:?}"
    );
    // ReopenContainerLog: after a rotation, the container's output goes
    // to a new file at log_path.
    let log = std::path::PathBuf::from(&s.log_path);
    std::fs::rename(&log, log.with_extension("log.1")).unwrap();
    c.ok(
        "ReopenContainerLog",
        c.runtime()
            .reopen_container_log(api::ReopenContainerLogRequest {
                container_id: app.clone(),
            }),
    );
    let lines = c.wait_log(&log, "tick");
    assert!(
        lines.iter().all(|(_, _, t)| t == "tick"),
        "the reopened log: {lines:?}"
    );
    // Env through exec too.
    assert_eq!(
        c.exec_ok(&app, &["sh", "-c", "echo $GREETING"]),
        "from-cri\n"
    );

    // hostPath mounts.
    assert_eq!(c.exec_ok(&app, &["cat", "/data-ro/in"]), "from-the-host\n");
    let r = c
        .exec_sync(&app, &["sh", "-c", "echo x > /data-ro/planted"], 0)
        .unwrap();
    assert_ne!(
        r.exit_code, 0,
        "a write to the read-only hostPath succeeded"
    );
    assert!(text(&r.stderr).contains("Read-only"), "{}", text(&r.stderr));
    assert!(!ro.join("planted").exists());
    c.exec_ok(
        &app,
        &["sh", "-c", "echo written-in-the-pod > /data-rw/out"],
    );
    assert_eq!(
        std::fs::read_to_string(rw.join("out")).unwrap(),
        "written-in-the-pod\n"
    );

    // The pod's hostname.
    assert_eq!(c.exec_ok(&app, &["hostname"]).trim(), "web-host");

    // Stats.
    let stats = c
        .ok(
            "ContainerStats",
            c.runtime().container_stats(api::ContainerStatsRequest {
                container_id: app.clone(),
            }),
        )
        .stats
        .expect("stats");
    let cpu = stats
        .cpu
        .and_then(|x| x.usage_core_nano_seconds)
        .map(|v| v.value);
    let mem = stats
        .memory
        .and_then(|x| x.working_set_bytes)
        .map(|v| v.value);
    assert!(cpu.unwrap_or(0) > 0, "cpu usage {cpu:?}");
    assert!(mem.unwrap_or(0) > 0, "memory working set {mem:?}");
    let listed = c.ok(
        "ListContainerStats",
        c.runtime()
            .list_container_stats(api::ListContainerStatsRequest::default()),
    );
    assert!(
        listed
            .stats
            .iter()
            .any(|s| s.attributes.as_ref().map(|a| a.id.as_str()) == Some(app.as_str())),
        "{listed:?}"
    );

    // PodSandboxStats: the pod's numbers, listing its container.
    let pod_stats = c.ok(
        "PodSandboxStats",
        c.runtime().pod_sandbox_stats(api::PodSandboxStatsRequest {
            pod_sandbox_id: pod.clone(),
        }),
    );
    let linux = pod_stats
        .stats
        .and_then(|s| s.linux)
        .expect("linux pod stats");
    let mem = linux
        .memory
        .and_then(|m| m.working_set_bytes)
        .map(|v| v.value);
    assert!(mem.unwrap_or(0) > 0, "pod memory working set {mem:?}");
    assert!(
        linux
            .containers
            .iter()
            .any(|s| s.attributes.as_ref().is_some_and(|a| a.id == app)),
        "the pod's stats list its container: {:?}",
        linux.containers
    );

    // UpdateContainerResources reaches the guest cgroup.
    assert_eq!(
        c.exec_ok(&app, &["sh", "-c", MEMORY_MAX]).trim(),
        (96u64 << 20).to_string()
    );
    c.ok(
        "UpdateContainerResources",
        c.runtime()
            .update_container_resources(api::UpdateContainerResourcesRequest {
                container_id: app.clone(),
                linux: Some(api::LinuxContainerResources {
                    memory_limit_in_bytes: 80 << 20,
                    ..Default::default()
                }),
                ..Default::default()
            }),
    );
    assert_eq!(
        c.exec_ok(&app, &["sh", "-c", MEMORY_MAX]).trim(),
        (80u64 << 20).to_string()
    );

    assert!(!c.links("veth").is_empty(), "the pod's veth");
    let cgroups = c.cgroups();
    assert!(
        cgroups.iter().any(|d| d.ends_with(&pod)),
        "the pod's host cgroup below {}: {cgroups:?}",
        c.cgroup_parent
    );
    assert_eq!(
        c.pod_netns().len(),
        1,
        "the pod's netns under the state dir"
    );
    c.stop_remove_pod(&pod);
    c.assert_no_leaks();
}

/// Two containers of a pod share its VM and its localhost: one serves on
/// 127.0.0.1:8080, the other fetches from it; the pod's hostname is theirs.
#[test]
fn cri_pod_members_share_one_vm_and_localhost() {
    let _leaks = LeakGuard::new();
    let c = Cri::start("lo");
    let pc = c.pod_config("duo");
    let pod = c.run_pod(&pc);
    let (srv, cli) = server_and_client(&c, (&pod, &pc), "127.0.0.1:8080", (&pod, &pc));
    assert_eq!(
        c.qemus().len(),
        1,
        "one QEMU for the pod, not per container"
    );
    assert_eq!(c.shims().len(), 1, "one shim for the pod");
    assert_eq!(c.boot_id(&srv), c.boot_id(&cli), "one guest");
    let got = c.exec_ok(&cli, &["sh", "-c", &fetch_passwd("127.0.0.1")]);
    assert!(
        got.contains("200 OK") && got.contains("root:x:0:0"),
        "{got}"
    );
    for id in [&srv, &cli] {
        assert_eq!(c.exec_ok(id, &["hostname"]).trim(), "duo-host");
    }
    // Each container has its own PID namespace (NamespaceMode::Container).
    let ps = c.exec_ok(&cli, &["ps", "-o", "comm"]);
    assert!(
        !ps.contains("httpd"),
        "the members share a PID namespace: {ps}"
    );
    c.stop_remove_pod(&pod);
    c.assert_no_leaks();
}

/// A second pod reaches the first by its pod IP over the CNI bridge: two
/// pods, two VMs.
#[test]
fn cri_pods_reach_each_other_by_pod_ip() {
    let _leaks = LeakGuard::new();
    let c = Cri::start("ip");
    let pc1 = c.pod_config("one");
    let pod1 = c.run_pod(&pc1);
    let ip1 = c.pod_ip(&pod1);
    let pc2 = c.pod_config("two");
    let pod2 = c.run_pod(&pc2);
    let (_srv, cli) = server_and_client(&c, (&pod1, &pc1), "8080", (&pod2, &pc2));
    let ip2 = c.pod_ip(&pod2);
    assert!(ip1.starts_with(SUBNET_PREFIX) && ip2.starts_with(SUBNET_PREFIX) && ip1 != ip2);
    assert_eq!(c.qemus().len(), 2, "one VM per pod");
    // The guest NIC carries the pod's address.
    let addrs = c.exec_ok(&cli, &["ip", "-o", "addr"]);
    assert!(
        addrs.contains(&format!("{ip2}/")),
        "pod two's addresses: {addrs}"
    );
    let r = c
        .exec_sync(&cli, &["sh", "-c", &fetch_passwd(&ip1)], 120)
        .unwrap();
    assert_eq!(
        r.exit_code,
        0,
        "pod two cannot reach pod one at {ip1}:8080: {}{}",
        text(&r.stdout),
        text(&r.stderr)
    );
    assert!(text(&r.stdout).contains("root:x:0:0"));
    c.stop_remove_pod(&pod2);
    c.stop_remove_pod(&pod1);
    c.assert_no_leaks();
}

/// A container over its memory limit is OOM-killed: exit 137, reason
/// OOMKilled; the pod (and its VM) runs on.
#[test]
fn cri_memory_limit_exceeded_is_oom_killed() {
    let _leaks = LeakGuard::new();
    let c = Cri::start("oom");
    let pc = c.pod_config("oom");
    let pod = c.run_pod(&pc);
    let mut cc = Cri::container_config("hog", &["tail", "/dev/zero"]);
    cc.linux.as_mut().unwrap().resources = Some(api::LinuxContainerResources {
        memory_limit_in_bytes: 32 << 20,
        ..Default::default()
    });
    let hog = c.run_container(&pod, &pc, cc);
    let s = c.wait_state(&hog, api::ContainerState::ContainerExited);
    assert_eq!(
        (s.exit_code, s.reason.as_str()),
        (137, "OOMKilled"),
        "{s:?}"
    );
    let st = c.pod_status(&pod).status.unwrap();
    assert_eq!(st.state, api::PodSandboxState::SandboxReady as i32);
    assert_eq!(c.qemus().len(), 1, "the pod's VM runs on");
    c.stop_remove_pod(&pod);
    c.assert_no_leaks();
}

/// A `ctr run` that merely names a CRI pod in its annotations does not get
/// into that pod's VM.
#[test]
fn cri_ctr_run_cannot_join_a_pod_vm() {
    let _leaks = LeakGuard::new();
    let c = Cri::start("trust");
    let pc = c.pod_config("victim");
    let pod = c.run_pod(&pc);
    let app = c.run_container(
        &pod,
        &pc,
        Cri::container_config("app", &["sleep", "100000"]),
    );
    c.wait_state(&app, api::ContainerState::ContainerRunning);
    let before = c.boot_id(&app);
    let intruder = format!("intruder-{}", std::process::id());
    husk_e2e::leak::watch(intruder.clone());
    let o = husk_e2e::run_with_input(
        {
            let mut cmd = c.ctr();
            cmd.args([
                "run",
                "--rm",
                "--null-io",
                "--runtime",
                "io.containerd.husk.v2",
            ])
            .args(["--annotation", "io.kubernetes.cri.container-type=container"])
            .arg("--annotation")
            .arg(format!("io.kubernetes.cri.sandbox-id={pod}"))
            .args([husk_e2e::containerd::IMAGE, &intruder])
            .args(["cat", "/proc/sys/kernel/random/boot_id"]);
            cmd
        },
        b"",
        Duration::from_secs(180),
    );
    let out = husk_e2e::stdout(&o);
    assert!(
        !out.contains(&before),
        "a ctr run naming pod {pod} ran in its VM: {out}"
    );
    assert_ne!(o.status.code(), Some(0), "{out}");
    assert!(
        husk_e2e::stderr(&o).contains("not created through CRI")
            || husk_e2e::stderr(&o).contains("does not join"),
        "{}",
        husk_e2e::stderr(&o)
    );
    assert_eq!(c.boot_id(&app), before, "the pod runs on");
    assert_eq!(c.qemus().len(), 1);
    let _ = c.ctr().args(["container", "rm", &intruder]).output();
    c.stop_remove_pod(&pod);
    wait_until(
        Duration::from_secs(30),
        "the intruder's container to go",
        || {
            !husk_e2e::stdout(&c.ctr().args(["container", "ls", "-q"]).output().unwrap())
                .contains(&intruder)
        },
    );
    c.assert_no_leaks();
}

/// CRI's `NamespaceOption.pid = POD` (kubelet's `shareProcessNamespace`):
/// the pod's containers share one PID namespace in the guest, the sandbox
/// container's, whose process is pid 1 there, so one sees the other's
/// processes; a member with `CONTAINER` in the same pod keeps its own.
#[test]
fn cri_pod_pid_namespace_is_shared_when_asked() {
    let _leaks = LeakGuard::new();
    let c = Cri::start("pidns");
    let mut pc = c.pod_config("pids");
    let pod_pid = |sc: &mut Option<api::NamespaceOption>| {
        sc.get_or_insert_with(Default::default).pid = api::NamespaceMode::Pod as i32;
    };
    pod_pid(
        &mut pc
            .linux
            .as_mut()
            .unwrap()
            .security_context
            .as_mut()
            .unwrap()
            .namespace_options,
    );
    let pod = c.run_pod(&pc);
    let member = |name: &str, args: &[&str]| {
        let mut cc = Cri::container_config(name, args);
        let sc = cc
            .linux
            .as_mut()
            .unwrap()
            .security_context
            .as_mut()
            .unwrap();
        pod_pid(&mut sc.namespace_options);
        cc
    };
    let a = c.run_container(&pod, &pc, member("a", &["sleep", "424242"]));
    let b = c.run_container(&pod, &pc, member("b", &["sleep", "100000"]));
    // Kubelet's default in the same pod: a PID namespace of its own.
    let solo = c.run_container(
        &pod,
        &pc,
        Cri::container_config("solo", &["sleep", "300000"]),
    );
    c.wait_state(&a, api::ContainerState::ContainerRunning);
    c.wait_state(&b, api::ContainerState::ContainerRunning);
    c.wait_state(&solo, api::ContainerState::ContainerRunning);
    let ps = c.exec_ok(&b, &["ps", "-o", "pid,args"]);
    assert!(
        ps.contains("sleep 424242"),
        "container b does not see container a's process in the pod's PID namespace:\n{ps}"
    );
    // The sandbox (pause) container's process is pid 1 there, as in a
    // Kubernetes pod with shareProcessNamespace.
    assert!(
        ps.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["1", "/bin/sleep", "2000000000"]),
        "the pod's sandbox process is not pid 1 of the shared PID namespace:\n{ps}"
    );
    let ns = |id: &str| c.exec_ok(id, &["readlink", "/proc/self/ns/pid"]);
    assert_eq!(ns(&a), ns(&b), "a and b are in different PID namespaces");
    let alone = c.exec_ok(&solo, &["ps", "-o", "args"]);
    assert!(
        !alone.contains("424242") && !alone.contains("2000000000"),
        "a container with pid = CONTAINER sees the pod's processes:\n{alone}"
    );
    assert_ne!(ns(&solo), ns(&a));
    c.stop_remove_pod(&pod);
    c.assert_no_leaks();
}

/// A `hostNetwork` pod cannot be a VM: RunPodSandbox fails with husk's
/// error saying what to use instead, and leaves nothing.
#[test]
fn cri_host_network_pod_is_refused_clearly() {
    let _leaks = LeakGuard::new();
    let c = Cri::start("hostnet");
    let mut pc = c.pod_config("hostnet");
    pc.linux
        .as_mut()
        .unwrap()
        .security_context
        .as_mut()
        .unwrap()
        .namespace_options
        .as_mut()
        .unwrap()
        .network = api::NamespaceMode::Node as i32;
    let r = c.call(
        300,
        "RunPodSandbox",
        c.runtime().run_pod_sandbox(api::RunPodSandboxRequest {
            config: Some(pc),
            runtime_handler: cri::HANDLER.into(),
        }),
    );
    let e = r.expect_err("a hostNetwork pod ran");
    assert!(
        e.message()
            .contains("cannot share the host's network stack"),
        "{}",
        e.message()
    );
    for p in c.list_pods() {
        c.ok(
            "RemovePodSandbox",
            c.runtime()
                .remove_pod_sandbox(api::RemovePodSandboxRequest { pod_sandbox_id: p }),
        );
    }
    c.assert_no_leaks();
}

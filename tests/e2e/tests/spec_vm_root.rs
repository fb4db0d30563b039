//! The OCI spec inside the VM, end to end: `husk run` on busybox bundles
//! (root, real QEMU under TCG) whose containers report what they are.
//! Each area gets one VM; checks that read well together share a container.
//!
//! The agent's tests (`crates/husk-agent/tests/agent_spec_root.rs`) cover
//! the same ground with the agent as a plain process; these prove that it
//! holds in the guest behind the host CLI, and cover what the host cannot
//! check (memory and pids limits need controllers a hybrid host lacks) and
//! what only the host does (hooks).

use std::os::unix::fs::PermissionsExt;

use std::time::Duration;

use husk_e2e::spec::*;
use husk_e2e::*;
use serde_json::json;

#[test]
fn vm_memory_limit_oom_kills_the_container() {
    let _leaks = LeakGuard::new();
    let env = Env::new("oom");
    let mut b = Bundle::busybox(&["sh", "-c", "exec tail < /dev/zero"]);
    // tail keeps a line that never ends: it grows until the OOM killer
    // ends it, 32 MiB in.
    b.set_resources(json!({"memory": {"limit": 33554432}}));
    b.save();
    let o = env.run(&b, "oom", b"");
    assert_exit(&o, 137);
    env.assert_no_leaks();
}

#[test]
fn vm_pids_limit_and_cgroup_namespace() {
    let _leaks = LeakGuard::new();
    let env = Env::new("pids");
    // The limits are visible in the container's own cgroup (its cgroup
    // namespace makes it "/"), then the pids limit refuses the 20th task.
    let mut b = Bundle::busybox(&[
        "sh",
        "-c",
        "cat /proc/self/cgroup /sys/fs/cgroup/memory.max /sys/fs/cgroup/pids.max; \
         for i in $(seq 1 40); do sleep 100 & done",
    ]);
    b.set_resources(json!({"memory": {"limit": 33554432}, "pids": {"limit": 20}}));
    b.add_namespace("cgroup");
    b.add_mount(json!({
        "destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
        "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]
    }));
    b.save();
    let o = env.run(&b, "pids", b"");
    assert_eq!(stdout(&o), "0::/\n33554432\n20\n", "stderr: {}", stderr(&o));
    assert!(stderr(&o).contains("can't fork"), "stderr: {}", stderr(&o));
    assert_ne!(o.status.code(), Some(0));
    env.assert_no_leaks();
}

#[test]
fn vm_user_namespace_with_podman_seccomp() {
    let _leaks = LeakGuard::new();
    let env = Env::new("userns");
    let mut b = Bundle::busybox(&[
        "sh",
        "-c",
        "cat /proc/self/uid_map /proc/self/gid_map; id -u; \
         grep -E '^(Seccomp|NoNewPrivs|CapEff):' /proc/self/status; \
         touch /x && chown 1 /x || echo chown-refused",
    ]);
    b.map_root_to(100000, 65536);
    b.spec["linux"]["seccomp"] = podman_seccomp_profile();
    b.set_capabilities(&["CAP_KILL"]);
    b.spec["process"]["noNewPrivileges"] = json!(true);
    b.save();
    let o = env.run(&b, "userns", b"");
    assert_exit(&o, 0);
    assert_eq!(
        normalized_lines(&stdout(&o)),
        [
            "0 100000 65536",
            "0 100000 65536",
            "0",
            "CapEff: 0000000000000020",
            "NoNewPrivs: 1",
            "Seccomp: 2",
            "chown-refused"
        ],
        "stderr: {}",
        stderr(&o)
    );
    // /x was created by the container's root: host uid 100000.
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(b.rootfs().join("x")).unwrap().uid(),
        100000
    );
    env.assert_no_leaks();
}

#[test]
fn vm_seccomp_errno_ret() {
    let _leaks = LeakGuard::new();
    let env = Env::new("seccomp");
    let mut b = Bundle::busybox(&["mkdir", "/x"]);
    b.spec["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}]
    });
    b.save();
    let o = env.run(&b, "seccomp", b"");
    assert_exit(&o, 1);
    assert!(
        stderr(&o).contains("Function not implemented"),
        "stderr: {}",
        stderr(&o)
    );
    assert!(!b.rootfs().join("x").exists());
    env.assert_no_leaks();
}

/// Capabilities, no_new_privs, rlimits, a read-only rootfs, masked and
/// read-only paths, sysctls and devices, in one container. Each line of
/// the script prints one fact; without the spec's setting it would print
/// something else (the guest's /proc/timer_list and /proc/irq are not
/// empty, /dev/shm and the ipc sysctls are writable by root, root may
/// chown).
#[test]
fn vm_process_and_filesystem_follow_the_spec() {
    let _leaks = LeakGuard::new();
    let env = Env::new("procfs");
    let mut b = Bundle::busybox(&[
        "sh",
        "-c",
        "grep -E '^(CapEff|NoNewPrivs):' /proc/self/status; \
         ulimit -n; ulimit -Hn; \
         touch /new && echo rootfs-writable || echo rootfs-read-only; \
         echo timer_list=$(wc -c < /proc/timer_list) irq=$(ls /proc/irq | wc -l) \
              secret=$(wc -c < /etc/secret); \
         cat /proc/sys/kernel/msgmax; \
         echo 1 > /proc/sys/kernel/msgmax && echo proc-sys-writable || echo proc-sys-read-only; \
         touch /dev/shm/f && echo shm-writable || echo shm-read-only; \
         touch /tmp/f && chown 5 /tmp/f && echo chown-ok || echo chown-refused; \
         ls -ln /dev/husk-null | awk '{print $1, $3, $4, $5 $6}'; \
         echo through > /dev/husk-null && echo device-works",
    ]);
    std::fs::write(b.rootfs().join("etc/secret"), "top secret\n").unwrap();
    b.set_capabilities(&["CAP_KILL", "CAP_DAC_OVERRIDE"]);
    b.spec["process"]["noNewPrivileges"] = json!(true);
    b.spec["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "soft": 321, "hard": 654}]);
    b.spec["root"]["readonly"] = json!(true);
    b.add_mount(json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"}));
    b.spec["linux"]["maskedPaths"] = json!(["/proc/timer_list", "/proc/irq", "/etc/secret"]);
    b.spec["linux"]["readonlyPaths"] = json!(["/proc/sys", "/dev/shm"]);
    b.spec["linux"]["sysctl"] = json!({"kernel.msgmax": "4321"});
    b.spec["linux"]["devices"] = json!([{
        "path": "/dev/husk-null", "type": "c", "major": 1, "minor": 3,
        "fileMode": 0o600, "uid": 1, "gid": 2
    }]);
    b.save();
    let o = env.run(&b, "procfs", b"");
    assert_exit(&o, 0);
    assert_eq!(
        normalized_lines(&stdout(&o)),
        [
            // CAP_KILL (5) and CAP_DAC_OVERRIDE (1) only.
            "CapEff: 0000000000000022",
            "NoNewPrivs: 1",
            "321",
            "654",
            "rootfs-read-only",
            "timer_list=0 irq=0 secret=0",
            "4321",
            "proc-sys-read-only",
            "shm-read-only",
            "chown-refused",
            "crw------- 1 2 1,3",
            "device-works",
        ],
        "stderr: {}",
        stderr(&o)
    );
    assert!(!b.rootfs().join("new").exists());
    env.assert_no_leaks();
}

#[test]
fn vm_hooks_run_on_the_host_in_order_with_the_state() {
    let _leaks = LeakGuard::new();
    let env = Env::new("hooks");
    let scratch = TempDir::new("hooks-out");
    let out = scratch.path().join("calls");
    let mut b = Bundle::busybox(&["echo", "in the container"]);
    let kinds = ["prestart", "createRuntime", "poststart", "poststop"];
    let mut hooks = json!({});
    for kind in kinds {
        hooks[kind] = json!([recording_hook(kind, &out)]);
    }
    b.spec["hooks"] = hooks;
    b.save();
    let o = env.run(&b, "hooks", b"");
    assert_exit(&o, 0);
    assert_eq!(stdout(&o), "in the container\n");
    let calls = hook_calls(&out);
    let names: Vec<&str> = calls.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, kinds, "{calls:?}");
    for c in &calls {
        assert_eq!(c.state["id"], "hooks", "{c:?}");
        assert_eq!(
            c.state["bundle"].as_str(),
            Some(b.dir().to_str().unwrap()),
            "{c:?}"
        );
        assert!(c.state["ociVersion"].is_string(), "{c:?}");
    }
    // runtime-spec: `created` once the create operation has finished (step
    // 2 of the lifecycle), which is when husk runs these hooks.
    for (c, status) in calls
        .iter()
        .zip(["created", "created", "running", "stopped"])
    {
        assert_eq!(c.state["status"], status, "{c:?}");
    }
    for c in &calls[..3] {
        assert!(c.state["pid"].as_i64().unwrap_or(0) > 0, "{c:?}");
    }
    env.assert_no_leaks();
}

#[test]
fn vm_failing_create_runtime_hook_fails_run_and_leaves_nothing() {
    let _leaks = LeakGuard::new();
    let env = Env::new("badhook");
    let scratch = TempDir::new("badhook-out");
    let out = scratch.path().join("calls");
    let refuse = scratch.path().join("refuse-hook");
    std::fs::write(&refuse, "#!/bin/sh\necho the hook says no >&2\nexit 7\n").unwrap();
    std::fs::set_permissions(&refuse, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut b = Bundle::busybox(&["touch", "/ran"]);
    b.spec["hooks"] = json!({
        "prestart": [recording_hook("prestart", &out)],
        "createRuntime": [{"path": refuse}],
        "poststart": [recording_hook("poststart", &out)]
    });
    b.save();
    let o = env.run(&b, "badhook", b"");
    assert_ne!(o.status.code(), Some(0));
    let err = stderr(&o);
    assert!(err.contains("createRuntime hook"), "stderr: {err}");
    assert!(err.contains(refuse.to_str().unwrap()), "stderr: {err}");
    assert!(err.contains("the hook says no"), "stderr: {err}");
    let names: Vec<String> = hook_calls(&out).into_iter().map(|c| c.name).collect();
    assert_eq!(names, ["prestart"]);
    assert!(!b.rootfs().join("ran").exists(), "the container ran");
    env.assert_no_leaks();
}

#[test]
fn vm_is_sized_and_pinned_by_the_spec() {
    let _leaks = LeakGuard::new();
    let env = Env::new("sizing");
    // 512 MiB and two CPUs' worth of quota, but pinned to host CPU 0: the VM
    // gets the memory on top of its own, one vCPU, and runs on CPU 0 only.
    // The block I/O limit names a host disk the guest does not have.
    let mut b = Bundle::busybox(&["sh", "-c", "sleep 3; grep MemTotal /proc/meminfo; nproc"]);
    b.set_resources(json!({
        "memory": {"limit": 536870912},
        "cpu": {"cpus": "0", "quota": 200000, "period": 100000},
        "blockIO": {"throttleReadBpsDevice": [{"major": 8, "minor": 0, "rate": 1048576}]}
    }));
    b.save();
    let mut c = env.husk();
    c.arg("run").arg("--bundle").arg(b.dir()).arg("sized");
    c.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = c.spawn().expect("husk run");
    let state = env.state_dir("sized").join("state.json");
    let vm_pid = wait_until(
        Duration::from_secs(60),
        "the VM's pid in state.json",
        || {
            std::fs::read(&state)
                .ok()
                .and_then(|s| serde_json::from_slice::<serde_json::Value>(&s).ok())
                .and_then(|v| v["vm_pid"].as_u64())
        },
    );
    let status = std::fs::read_to_string(format!("/proc/{vm_pid}/status")).unwrap();
    let allowed = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(str::trim);
    assert_eq!(allowed, Some("0"), "QEMU's affinity");
    let o = child.wait_with_output().unwrap();
    assert_exit(&o, 0);
    let out = stdout(&o);
    let mut lines = out.lines();
    let mem_kib: u64 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal in {out:?}"));
    assert!(mem_kib > 512 * 1024, "MemTotal {mem_kib} kB: {out:?}");
    assert_eq!(lines.next(), Some("1"), "nproc: {out:?}");

    // Host CPUs husk may not use are refused before anything exists.
    let mut bad = Bundle::busybox(&["true"]);
    bad.set_resources(json!({"cpu": {"cpus": "4000"}}));
    bad.save();
    let o = env.run(&bad, "badcpus", b"");
    assert_one_line_error(&o, "linux.resources.cpu.cpus \"4000\"");
    env.assert_no_leaks();
}

#[test]
fn vm_device_rules_are_enforced() {
    let _leaks = LeakGuard::new();
    let env = Env::new("devices");
    // Deny everything (as podman does first): a node the container makes
    // cannot be opened, the standard devices still work.
    let mut b = Bundle::busybox(&[
        "sh",
        "-c",
        "mknod /dev/kmsg2 c 1 11 && echo made; \
         echo hi > /dev/kmsg2 && echo opened; \
         echo x > /dev/null && echo null-ok",
    ]);
    b.set_resources(json!({"devices": [{"allow": false, "access": "rwm"}]}));
    b.save();
    let o = env.run(&b, "devices", b"");
    assert_eq!(stdout(&o), "made\nnull-ok\n", "stderr: {}", stderr(&o));
    assert!(
        stderr(&o).contains("Operation not permitted"),
        "stderr: {}",
        stderr(&o)
    );
    env.assert_no_leaks();
}

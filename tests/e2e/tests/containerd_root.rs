//! The containerd shim (`io.containerd.husk.v2`) end to end: a private
//! containerd 1.6 per test, `ctr` as the client, a local busybox image,
//! real VMs under TCG. Root only.

use std::process::{Command, Stdio};
use std::time::Duration;

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use husk_e2e::console::{is_pts_name, tty_line};
use husk_e2e::containerd::{pb_bytes, pb_uint, run_on_pty, shim_call, Containerd, IMAGE, RUNTIME};
use husk_e2e::*;

/// Checks it runs on a terminal, prints the terminal's name, and its size
/// once `ctr` has sent it (it resizes right after the start, so a fast
/// process may see 0x0 first).
const TTY_SCRIPT: &str =
    "[ -t 0 ] && [ -t 1 ] && echo on-a-tty; echo tty=$(tty); for i in $(seq 100); do \
    s=$(stty size 2>/dev/null); case \"$s\" in [1-9]*) break;; esac; sleep 0.1; done; echo size=$s";

fn out(o: &std::process::Output) -> String {
    stdout(o)
}

#[test]
fn ctrd_run_kernel_exit_env_mounts_readonly() {
    let _leaks = LeakGuard::new();
    let c = Containerd::start("run");
    let o = c.run_rm(&[], "uname", &["uname", "-r"]);
    assert_exit(&o, 0);
    assert_eq!(out(&o).trim(), guest_release(), "the guest kernel answers");

    let o = c.run_rm(&[], "exit7", &["sh", "-c", "exit 7"]);
    assert_exit(&o, 7);

    let host = TempDir::new("ctrd-bind");
    std::fs::write(host.path().join("in"), "from the host\n").unwrap();
    let mount = format!(
        "type=bind,src={},dst=/data,options=rbind:rw",
        host.path().display()
    );
    let o = c.run_rm(
        &[
            "--env",
            "GREETING=hello",
            "--cwd",
            "/tmp",
            "--mount",
            &mount,
        ],
        "attrs",
        &[
            "sh",
            "-c",
            "echo $GREETING; pwd; cat /data/in; echo written > /data/out",
        ],
    );
    assert_exit(&o, 0);
    assert_eq!(out(&o), "hello\n/tmp\nfrom the host\n");
    assert_eq!(
        std::fs::read_to_string(host.path().join("out")).unwrap(),
        "written\n",
        "a write to a bind mount lands on the host"
    );

    let o = c.run_rm(&["--read-only"], "ro", &["sh", "-c", "touch /x"]);
    assert_ne!(o.status.code(), Some(0), "read-only rootfs was writable");
    assert!(
        stderr(&o).contains("Read-only file system"),
        "stderr: {}",
        stderr(&o)
    );
    c.assert_no_leaks();
}

#[test]
fn ctrd_stdin_stdout_tty() {
    let _leaks = LeakGuard::new();
    let c = Containerd::start("stdio");
    // 1 MiB of stdin, fed once the task runs (ctr loses an end-of-input that
    // comes before the task exists), checked by hash.
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 + i / 4099) as u8).collect();
    let expected = {
        let mut h = Command::new("sha256sum")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(h.stdin.as_mut().unwrap(), &data).unwrap();
        drop(h.stdin.take());
        String::from_utf8(h.wait_with_output().unwrap().stdout).unwrap()
    };
    let mut cmd = c.run_cmd(&["--rm", IMAGE, "stdin", "sha256sum"]);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    c.wait_status("stdin", "RUNNING");
    let mut stdin = child.stdin.take().unwrap();
    std::io::Write::write_all(&mut stdin, &data).unwrap();
    drop(stdin);
    let pid = child.id();
    let waiter = std::thread::spawn(move || child.wait_with_output().unwrap());
    let done = try_wait_until(Duration::from_secs(120), || waiter.is_finished()).is_some();
    if !done {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        panic!("ctr run with piped stdin did not finish");
    }
    let o = waiter.join().unwrap();
    assert_exit(&o, 0);
    assert_eq!(
        out(&o).split_whitespace().next(),
        expected.split_whitespace().next(),
        "stdin arrived intact"
    );

    // 10 MiB of stdout, complete and in order.
    let n = 1_400_000;
    let o = c.run_rm(&[], "seq", &["seq", "1", &n.to_string()]);
    assert_exit(&o, 0);
    let expected: String = (1..=n).map(|i| format!("{i}\n")).collect();
    assert!(expected.len() > 10_000_000);
    assert_eq!(o.stdout.len(), expected.len(), "output length");
    assert!(o.stdout == expected.as_bytes(), "output differs from seq");

    // A terminal: the process sees a tty, its output comes back.
    let cmd = c.run_cmd(&["--rm", "-t", IMAGE, "tty", "sh", "-c", TTY_SCRIPT]);
    let (text, code) = run_on_pty(cmd, Duration::from_secs(120));
    assert_eq!(code, Some(0), "output: {text}");
    assert!(text.contains("on-a-tty"), "output: {text}");
    assert!(
        tty_line(&text).is_some_and(is_pts_name),
        "a terminal of the container's devpts: {text}"
    );
    assert!(
        text.contains("size=24 80"),
        "the terminal's size reaches the guest: {text}"
    );
    c.assert_no_leaks();
}

#[test]
fn ctrd_task_start_exec_ps_metrics_pause_kill_delete() {
    let _leaks = LeakGuard::new();
    let c = Containerd::start("tasks");
    // `ctr container create` + `ctr task start -d`.
    let o = c
        .ctr()
        .args([
            "container",
            "create",
            "--runtime",
            RUNTIME,
            IMAGE,
            "t1",
            "--",
        ])
        .args([
            "sh",
            "-c",
            "trap 'exit 3' TERM; while true; do sleep 1; done",
        ])
        .output()
        .unwrap();
    assert_exit(&o, 0);
    let o = c.ctr_out(&["task", "start", "-d", "--null-io", "t1"]);
    assert_exit(&o, 0);
    c.wait_status("t1", "RUNNING");
    c.note_socket("t1");

    // exec: output and exit code, then with a terminal.
    let o = c.ctr_out(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "t1",
        "sh",
        "-c",
        "echo exec-out; exit 5",
    ]);
    assert_exit(&o, 5);
    assert_eq!(out(&o), "exec-out\n");
    // containerd may reuse an exec id once the exec is deleted.
    let o = c.ctr_out(&["task", "exec", "--exec-id", "e1", "t1", "echo", "again"]);
    assert_exit(&o, 0);
    assert_eq!(out(&o), "again\n");
    let mut cmd = c.ctr();
    cmd.args(["task", "exec", "-t", "--exec-id", "e2", "t1"])
        .args(["sh", "-c", TTY_SCRIPT]);
    let (text, code) = run_on_pty(cmd, Duration::from_secs(60));
    assert_eq!(code, Some(0), "output: {text}");
    assert!(
        text.contains("on-a-tty") && text.contains("size=24 80"),
        "output: {text}"
    );
    assert!(
        tty_line(&text).is_some_and(is_pts_name),
        "a terminal of the container's devpts: {text}"
    );

    // CloseIO ends an exec's stdin (after what was already written) while
    // the client still holds its end open.
    let mut cmd = c.ctr();
    cmd.args(["task", "exec", "--exec-id", "cat", "t1", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(b"before-close\n").unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut output = child.stdout.take().unwrap();
    let sink = seen.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        while let Ok(n) = output.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    wait_until(Duration::from_secs(60), "cat to echo its input", || {
        seen.lock().unwrap().ends_with(b"before-close\n")
    });
    let mut req = Vec::new();
    pb_bytes(&mut req, 1, b"t1");
    pb_bytes(&mut req, 2, b"cat");
    pb_uint(&mut req, 3, 1);
    shim_call(&c.shim_socket("t1"), "CloseIO", &req).expect("CloseIO");
    wait_until(
        Duration::from_secs(60),
        "cat to see the end of its input",
        || matches!(child.try_wait(), Ok(Some(_))),
    );
    assert_eq!(child.wait().unwrap().code(), Some(0));
    reader.join().unwrap();
    drop(input);
    assert_eq!(&*seen.lock().unwrap(), b"before-close\n");

    // ps: the guest's pids of the container.
    let o = c.ctr_out(&["task", "ps", "t1"]);
    assert_exit(&o, 0);
    assert!(out(&o).lines().count() >= 2, "ps: {}", out(&o));

    // metrics: cgroup v2 numbers from the guest.
    let o = c.ctr_out(&["task", "metrics", "t1"]);
    assert_exit(&o, 0);
    let m = out(&o);
    assert!(
        m.contains("pids.current") && m.contains("memory.usage"),
        "metrics: {m}"
    );

    // Update (ctr 1.6 has no `task update`: ask the shim directly), then
    // metrics show the new limit.
    let mut any = Vec::new();
    pb_bytes(
        &mut any,
        1,
        b"types.containerd.io/opencontainers/runtime-spec/1/LinuxResources",
    );
    pb_bytes(&mut any, 2, br#"{"memory":{"limit":50331648}}"#);
    let mut req = Vec::new();
    pb_bytes(&mut req, 1, b"t1");
    pb_bytes(&mut req, 2, &any);
    shim_call(&c.shim_socket("t1"), "Update", &req).expect("Update");
    let o = c.ctr_out(&["task", "metrics", "t1"]);
    assert!(
        out(&o)
            .lines()
            .any(|l| l.contains("memory.usage_limit") && l.contains("50331648")),
        "metrics after update: {}",
        out(&o)
    );

    // Checkpoint: a clear no.
    let o = c.ctr_out(&["task", "checkpoint", "t1"]);
    assert_ne!(o.status.code(), Some(0));
    assert!(
        stderr(&o).contains("checkpoint is not supported by husk"),
        "{}",
        stderr(&o)
    );

    // pause and resume.
    assert_exit(&c.ctr_out(&["task", "pause", "t1"]), 0);
    assert_eq!(c.task_status("t1").as_deref(), Some("PAUSED"));
    assert_exit(&c.ctr_out(&["task", "resume", "t1"]), 0);
    assert_eq!(c.task_status("t1").as_deref(), Some("RUNNING"));

    // SIGTERM: the trap exits 3; `ctr task delete` reports it.
    assert_exit(&c.ctr_out(&["task", "kill", "t1"]), 0);
    c.wait_status("t1", "STOPPED");
    let o = c.ctr_out(&["task", "delete", "t1"]);
    assert_exit(&o, 0);
    assert!(stderr(&o).contains("exit code 3"), "{}", stderr(&o));

    // SIGKILL to all of a second task's processes.
    c.run_detached(&[], "t2", &["sh", "-c", "sleep 1000 & sleep 1000"]);
    assert_exit(
        &c.ctr_out(&["task", "kill", "-a", "-s", "SIGKILL", "t2"]),
        0,
    );
    c.wait_status("t2", "STOPPED");
    let o = c.ctr_out(&["task", "delete", "t2"]);
    assert!(stderr(&o).contains("exit code 137"), "{}", stderr(&o));
    assert_exit(&c.ctr_out(&["container", "rm", "t1", "t2"]), 0);
    c.assert_no_leaks();
}

#[test]
fn ctrd_oom_is_an_event_and_exit_137() {
    let _leaks = LeakGuard::new();
    let c = Containerd::start("oom");
    let events_log = c.dir.path().join("events.log");
    let mut events = c
        .ctr()
        .arg("events")
        .stdout(std::fs::File::create(&events_log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let o = c.run_rm(
        &["--memory-limit", "33554432"],
        "oom",
        &["sh", "-c", "exec tail < /dev/zero"],
    );
    assert_exit(&o, 137);
    let seen = try_wait_until(Duration::from_secs(30), || {
        let text = std::fs::read_to_string(&events_log).unwrap_or_default();
        text.lines()
            .any(|l| l.contains("/tasks/oom") && l.contains("\"oom\""))
            && text
                .lines()
                .any(|l| l.contains("/tasks/exit") && l.contains("137"))
    })
    .is_some();
    let _ = events.kill();
    let _ = events.wait();
    assert!(
        seen,
        "no OOM and exit events:\n{}",
        std::fs::read_to_string(&events_log).unwrap_or_default()
    );
    // containerd hears of the start before the end.
    let text = std::fs::read_to_string(&events_log).unwrap();
    let pos = |topic: &str| text.lines().position(|l| l.contains(topic));
    assert!(
        matches!((pos("/tasks/start"), pos("/tasks/exit")), (Some(a), Some(b)) if a < b),
        "events out of order:\n{text}"
    );
    c.assert_no_leaks();
}

#[test]
fn ctrd_pod_shares_one_vm() {
    let _leaks = LeakGuard::new();
    let c = Containerd::start("pod");
    let sandbox = [
        "--annotation",
        "io.kubernetes.cri.container-type=sandbox",
        "--annotation",
        "io.kubernetes.cri.sandbox-id=pod1",
    ];
    let member = [
        "--annotation",
        "io.kubernetes.cri.container-type=container",
        "--annotation",
        "io.kubernetes.cri.sandbox-id=pod1",
    ];
    // The sandbox's memory limit sizes the VM: the configured 256 MiB plus 64.
    let mut sized = sandbox.to_vec();
    sized.extend(["--memory-limit", "67108864"]);
    c.run_detached(&sized, "pod1", &["sleep", "1000"]);
    c.run_detached(&member, "pod1-app", &["sleep", "1000"]);
    let boot_id = |id: &str| {
        let o = c.ctr_out(&[
            "task",
            "exec",
            "--exec-id",
            "boot",
            id,
            "cat",
            "/proc/sys/kernel/random/boot_id",
        ]);
        assert_exit(&o, 0);
        out(&o).trim().to_string()
    };
    let a = boot_id("pod1");
    let b = boot_id("pod1-app");
    assert!(!a.is_empty());
    assert_eq!(a, b, "both containers run in one guest");
    assert_eq!(c.qemus().len(), 1, "one VM for the pod");
    let qemu = std::fs::read(format!("/proc/{}/cmdline", c.qemus()[0])).unwrap();
    let qemu = String::from_utf8_lossy(&qemu).replace('\0', " ");
    assert!(qemu.contains(" -m 320M "), "VM size: {qemu}");
    assert_eq!(c.shims().len(), 1, "one shim for the pod");

    // A member that cannot be created leaves the pod as it was.
    let mut bad = vec!["--rm", "--null-io"];
    bad.extend_from_slice(&member);
    bad.extend_from_slice(&[IMAGE, "pod1-bad", "/nonexistent"]);
    let o = c.output(c.run_cmd(&bad), b"");
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("/nonexistent"), "{}", stderr(&o));
    assert_eq!(boot_id("pod1-app"), a, "the pod still runs");
    let shim_mounts = std::fs::read_to_string(format!("/proc/{}/mountinfo", c.shims()[0])).unwrap();
    let held: Vec<&str> = shim_mounts
        .lines()
        .filter(|l| l.contains("pod1-bad") && l.contains(" - overlay "))
        .collect();
    assert!(
        held.is_empty(),
        "the failed member's rootfs is still mounted: {held:?}"
    );

    for id in ["pod1-app", "pod1"] {
        assert_exit(&c.ctr_out(&["task", "kill", "-s", "SIGKILL", id]), 0);
        c.wait_status(id, "STOPPED");
        let o = c.ctr_out(&["task", "delete", id]);
        assert!(stderr(&o).contains("exit code 137"), "{}", stderr(&o));
    }
    assert_exit(&c.ctr_out(&["container", "rm", "pod1-app", "pod1"]), 0);

    // A pod whose sandbox goes first takes its other containers along.
    let sandbox2 = [
        "--annotation",
        "io.kubernetes.cri.container-type=sandbox",
        "--annotation",
        "io.kubernetes.cri.sandbox-id=pod2",
    ];
    let member2 = [
        "--annotation",
        "io.kubernetes.cri.container-type=container",
        "--annotation",
        "io.kubernetes.cri.sandbox-id=pod2",
    ];
    c.run_detached(&sandbox2, "pod2", &["sleep", "1000"]);
    c.run_detached(&member2, "pod2-app", &["sleep", "1000"]);
    assert_exit(&c.ctr_out(&["task", "kill", "-s", "SIGKILL", "pod2"]), 0);
    c.wait_status("pod2", "STOPPED");
    c.ctr_out(&["task", "delete", "pod2"]);
    wait_until(
        Duration::from_secs(60),
        "the member to stop with its pod",
        || c.task_status("pod2-app").as_deref() != Some("RUNNING"),
    );
    c.ctr_out(&["task", "delete", "pod2-app"]);
    wait_until(
        Duration::from_secs(60),
        "containerd to drop the member",
        || c.task_status("pod2-app").is_none(),
    );
    assert_exit(&c.ctr_out(&["container", "rm", "pod2-app", "pod2"]), 0);
    c.assert_no_leaks();
}

/// The containers of a pod share its network (and IPC, UTS) namespaces in
/// the guest, as CRI asks: the members' namespace paths name the sandbox
/// task's pid (`--with-ns`, as containerd's CRI writes them). One member
/// serves on 127.0.0.1:8080, the other connects to it.
#[test]
fn ctrd_pod_members_share_loopback() {
    let _leaks = LeakGuard::new();
    let c = Containerd::start("podnet");
    let sandbox = [
        "--annotation",
        "io.kubernetes.cri.container-type=sandbox",
        "--annotation",
        "io.kubernetes.cri.sandbox-id=pod3",
    ];
    c.run_detached(&sandbox, "pod3", &["sleep", "1000"]);
    let ls = c.ctr_out(&["task", "ls"]);
    let pid = out(&ls)
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&"pod3")).then(|| f.get(1).unwrap_or(&"").to_string())
        })
        .expect("the sandbox task's pid");
    let ns = |t: &str| {
        format!(
            "{t}:/proc/{pid}/ns/{}",
            if t == "network" { "net" } else { t }
        )
    };
    let (net, ipc, uts) = (ns("network"), ns("ipc"), ns("uts"));
    let member = [
        "--annotation",
        "io.kubernetes.cri.container-type=container",
        "--annotation",
        "io.kubernetes.cri.sandbox-id=pod3",
        "--with-ns",
        &net,
        "--with-ns",
        &ipc,
        "--with-ns",
        &uts,
    ];
    c.run_detached(
        &member,
        "pod3-srv",
        &["httpd", "-f", "-p", "127.0.0.1:8080", "-h", "/etc"],
    );
    let client = "for i in $(seq 100); do \
                    printf 'GET /passwd HTTP/1.0\\r\\n\\r\\n' | nc 127.0.0.1 8080 && exit 0; \
                    sleep 0.1; \
                  done; exit 1";
    let o = c.run_rm(&member, "pod3-cli", &["sh", "-c", client]);
    assert_exit(&o, 0);
    let text = out(&o);
    assert!(text.contains("200 OK"), "{text}");
    assert!(text.contains("root:x:0:0"), "{text}");
    assert_eq!(c.qemus().len(), 1, "one VM for the pod");
    // The member's network, IPC and UTS namespaces are the sandbox's; its
    // PID and mount namespaces its own.
    let links = |id: &str| {
        let o = c.ctr_out(&[
            "task",
            "exec",
            "--exec-id",
            "links",
            id,
            "sh",
            "-c",
            "for n in net ipc uts pid mnt; do readlink /proc/self/ns/$n; done",
        ]);
        assert_exit(&o, 0);
        out(&o).lines().map(str::to_string).collect::<Vec<_>>()
    };
    let (theirs, ours) = (links("pod3"), links("pod3-srv"));
    assert_eq!(theirs.len(), 5, "{theirs:?}");
    assert_eq!(theirs[..3], ours[..3], "shared with the sandbox");
    assert_ne!(theirs[3], ours[3], "own pid namespace");
    assert_ne!(theirs[4], ours[4], "own mount namespace");

    for id in ["pod3-srv", "pod3"] {
        assert_exit(&c.ctr_out(&["task", "kill", "-s", "SIGKILL", id]), 0);
        c.wait_status(id, "STOPPED");
        c.ctr_out(&["task", "delete", id]);
    }
    assert_exit(&c.ctr_out(&["container", "rm", "pod3-srv", "pod3"]), 0);
    c.assert_no_leaks();
}

#[test]
fn ctrd_restart_keeps_tasks_dead_vms_and_shims_are_cleaned() {
    let _leaks = LeakGuard::new();
    let mut c = Containerd::start("restart");
    c.run_detached(&[], "r1", &["sleep", "1000"]);
    assert_eq!(c.shim_socket("r1"), c.expected_socket("r1"));
    c.restart();
    assert_eq!(c.task_status("r1").as_deref(), Some("RUNNING"));
    // Events reach the new containerd.
    let events_log = c.dir.path().join("events.log");
    let mut events = c
        .ctr()
        .arg("events")
        .stdout(std::fs::File::create(&events_log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let o = c.ctr_out(&[
        "task",
        "exec",
        "--exec-id",
        "after",
        "r1",
        "echo",
        "still-here",
    ]);
    assert_exit(&o, 0);
    assert_eq!(out(&o), "still-here\n");
    assert_exit(&c.ctr_out(&["task", "kill", "-s", "SIGKILL", "r1"]), 0);
    c.wait_status("r1", "STOPPED");
    let seen = try_wait_until(Duration::from_secs(60), || {
        std::fs::read_to_string(&events_log)
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains("/tasks/exit") && l.contains("\"r1\"") && l.contains("137"))
    })
    .is_some();
    let _ = events.kill();
    let _ = events.wait();
    assert!(
        seen,
        "no exit event after the restart:\n{}",
        std::fs::read_to_string(&events_log).unwrap_or_default()
    );
    let o = c.ctr_out(&["task", "delete", "r1"]);
    assert!(stderr(&o).contains("exit code 137"), "{}", stderr(&o));

    // A VM that dies: its processes end with 255, the task can be deleted.
    c.run_detached(&[], "vm-dies", &["sleep", "1000"]);
    let qemus = c.qemus();
    assert_eq!(qemus.len(), 1);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(qemus[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    c.wait_status("vm-dies", "STOPPED");
    let o = c.ctr_out(&["task", "delete", "vm-dies"]);
    assert!(stderr(&o).contains("exit code 255"), "{}", stderr(&o));
    assert_exit(&c.ctr_out(&["container", "rm", "vm-dies"]), 0);

    // A shim that dies: containerd runs `shim delete`, which removes what it
    // left (its VM dies with it).
    // (Its config comes from the runtime options: a smaller VM.)
    let small = c.dir.path().join("small.toml");
    let base = std::fs::read_to_string(c.dir.path().join("husk.toml")).unwrap();
    std::fs::write(&small, format!("{base}memory_mib = 200\n")).unwrap();
    let small = small.to_string_lossy().to_string();
    c.run_detached(&["--runtime-config-path", &small], "r2", &["sleep", "1000"]);
    let qemu = std::fs::read(format!("/proc/{}/cmdline", c.qemus()[0])).unwrap();
    let qemu = String::from_utf8_lossy(&qemu).replace('\0', " ");
    assert!(qemu.contains(" -m 200M "), "VM size: {qemu}");
    let shims = c.shims();
    assert_eq!(shims.len(), 1);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shims[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until(
        Duration::from_secs(60),
        "containerd to drop the task of a dead shim",
        || c.task_status("r2").is_none(),
    );
    assert_exit(&c.ctr_out(&["container", "rm", "r1", "r2"]), 0);
    c.assert_no_leaks();
    // The dead shim's host cgroup (`/default/r2`, ctr's cgroupsPath) went
    // with its pod.
    for h in ["memory", "cpu", "pids"] {
        let dir = std::path::Path::new("/sys/fs/cgroup")
            .join(h)
            .join("default/r2");
        assert!(!dir.exists(), "host cgroup left behind: {}", dir.display());
    }
}

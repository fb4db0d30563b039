//! `husk run` end to end, as root, booting real VMs (QEMU under TCG here)
//! with the real guest kernel and agent.

use std::process::{Command, Stdio};

use husk_e2e::*;

#[test]
fn vm_uname_is_the_guest_kernel() {
    let _leaks = LeakGuard::new();
    let env = Env::new("uname");
    let b = Bundle::busybox(&["uname", "-r"]);
    let o = env.run(&b, "uname", b"");
    assert_exit(&o, 0);
    let host = String::from_utf8(Command::new("uname").arg("-r").output().unwrap().stdout).unwrap();
    assert_eq!(stdout(&o).trim(), guest_release());
    assert_ne!(stdout(&o).trim(), host.trim());
    env.assert_no_leaks();
}

/// Loopback in the guest: a container's own network namespace and the
/// guest's (which a spec without `linux.namespaces` shares) both have `lo`
/// up with 127.0.0.1, and nothing else.
#[test]
fn vm_loopback_is_up_in_new_and_guest_network_namespaces() {
    let _leaks = LeakGuard::new();
    let env = Env::new("lo");
    let script =
        "ls /sys/class/net; ip addr show lo; readlink /proc/self/ns/net; readlink /proc/1/ns/net";
    let b = Bundle::busybox(&["sh", "-c", script]);
    let o = env.run(&b, "lo-own", b"");
    assert_exit(&o, 0);
    let own = stdout(&o);
    assert_eq!(own.lines().next(), Some("lo"), "{own}");
    assert!(own.contains("<LOOPBACK,UP,LOWER_UP>"), "{own}");
    assert!(own.contains("inet 127.0.0.1/8"), "{own}");

    // No namespace list at all: the guest's own namespaces (PID 1 is the
    // agent, whose network namespace this is).
    let mut b = Bundle::busybox(&["sh", "-c", script]);
    b.spec["linux"]
        .as_object_mut()
        .unwrap()
        .remove("namespaces");
    b.spec.as_object_mut().unwrap().remove("hostname");
    b.save();
    let o = env.run(&b, "lo-guest", b"");
    assert_exit(&o, 0);
    let guest = stdout(&o);
    assert!(guest.contains("<LOOPBACK,UP,LOWER_UP>"), "{guest}");
    assert!(guest.contains("inet 127.0.0.1/8"), "{guest}");
    let links: Vec<&str> = guest.lines().filter(|l| l.starts_with("net:")).collect();
    assert_eq!(links.len(), 2, "{guest}");
    assert_eq!(links[0], links[1], "shares the guest's netns: {guest}");
    env.assert_no_leaks();
}

#[test]
fn vm_exit_status_and_signals() {
    let _leaks = LeakGuard::new();
    let env = Env::new("exit");
    let b = Bundle::busybox(&["sh", "-c", "exit 3"]);
    assert_exit(&env.run(&b, "exit3", b""), 3);
    // The init of a PID namespace cannot be SIGKILLed from inside it (as
    // under runc), so this container shares the guest's PID namespace.
    let mut b = Bundle::busybox(&["sh", "-c", "kill -9 $$"]);
    b.spec["linux"]["namespaces"] = serde_json::json!([{"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}]);
    b.save();
    assert_exit(&env.run(&b, "kill9", b""), 137);
    env.assert_no_leaks();
}

#[test]
fn vm_stdin_and_long_output() {
    let _leaks = LeakGuard::new();
    let env = Env::new("stdio");
    let b = Bundle::busybox(&["cat"]);
    let o = env.run(&b, "cat", b"data\n");
    assert_exit(&o, 0);
    assert_eq!(stdout(&o), "data\n");

    // 10 MB of numbered lines: complete and in order.
    let n = 1_400_000;
    let b = Bundle::busybox(&["seq", "1", &n.to_string()]);
    let o = env.run(&b, "seq", b"");
    assert_exit(&o, 0);
    let expected: String = (1..=n).map(|i| format!("{i}\n")).collect();
    assert!(expected.len() > 10_000_000);
    assert_eq!(o.stdout.len(), expected.len(), "output length");
    assert!(
        o.stdout == expected.as_bytes(),
        "output differs from seq 1 {n}"
    );
    env.assert_no_leaks();
}

#[test]
fn vm_stderr_is_separate() {
    let _leaks = LeakGuard::new();
    let env = Env::new("stderr");
    let b = Bundle::busybox(&["sh", "-c", "echo out; echo err >&2"]);
    let o = env.run(&b, "stderr", b"");
    assert_exit(&o, 0);
    assert_eq!(stdout(&o), "out\n");
    assert!(stderr(&o).ends_with("err\n"), "stderr: {}", stderr(&o));
    env.assert_no_leaks();
}

#[test]
fn vm_env_cwd_user_hostname_follow_the_spec() {
    let _leaks = LeakGuard::new();
    let env = Env::new("procattrs");
    let mut b = Bundle::busybox(&["sh", "-c", "echo $GREETING; pwd; id -u; id -g; hostname"]);
    std::fs::create_dir_all(b.rootfs().join("work")).unwrap();
    let p = &mut b.spec["process"];
    p["env"]
        .as_array_mut()
        .unwrap()
        .push("GREETING=hello from the spec".into());
    p["cwd"] = "/work".into();
    p["user"] = serde_json::json!({"uid": 1000, "gid": 1001});
    b.spec["hostname"] = "husk-test-host".into();
    b.save();
    let o = env.run(&b, "attrs", b"");
    assert_exit(&o, 0);
    assert_eq!(
        stdout(&o),
        "hello from the spec\n/work\n1000\n1001\nhusk-test-host\n"
    );
    env.assert_no_leaks();
}

fn rootfs_write_reaches_host(share: Share) {
    let env = Env::with("share", share, |_| {});
    let b = Bundle::busybox(&[
        "sh",
        "-c",
        "echo written-in-the-guest > /tmp/out.txt && uname -r >> /tmp/out.txt",
    ]);
    let o = env.run(&b, "write", b"");
    assert_exit(&o, 0);
    let text = std::fs::read_to_string(b.rootfs().join("tmp/out.txt"))
        .expect("file written by the container");
    assert_eq!(text, format!("written-in-the-guest\n{}\n", guest_release()));
    env.assert_no_leaks();
}

#[test]
fn vm_rootfs_write_reaches_host_virtiofs() {
    let _leaks = LeakGuard::new();
    rootfs_write_reaches_host(Share::Virtiofs);
}

#[test]
fn vm_rootfs_write_reaches_host_9p() {
    let _leaks = LeakGuard::new();
    rootfs_write_reaches_host(Share::NineP);
}

#[test]
fn vm_bind_mount_from_host() {
    let _leaks = LeakGuard::new();
    let env = Env::new("bind");
    let data = TempDir::new("data");
    std::fs::write(data.path().join("in.txt"), "from the host\n").unwrap();
    let mut b = Bundle::busybox(&["sh", "-c", "cat /data/in.txt && echo back > /data/out.txt"]);
    b.spec["mounts"].as_array_mut().unwrap().push(serde_json::json!({
        "destination": "/data", "type": "bind", "source": data.path(), "options": ["rbind", "rw"]
    }));
    b.save();
    let o = env.run(&b, "bind", b"");
    assert_exit(&o, 0);
    assert_eq!(stdout(&o), "from the host\n");
    assert_eq!(
        std::fs::read_to_string(data.path().join("out.txt")).unwrap(),
        "back\n"
    );
    env.assert_no_leaks();
}

#[test]
fn vm_sigterm_to_husk_reaches_the_container() {
    let _leaks = LeakGuard::new();
    let env = Env::new("sigterm");
    let b = Bundle::busybox(&[
        "sh",
        "-c",
        "trap 'echo got-term; exit 42' TERM; echo ready; while true; do sleep 0.1; done",
    ]);
    let mut c = env.husk();
    c.arg("run").arg("--bundle").arg(b.dir()).arg("sigterm");
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut first = [0u8; 6];
    std::io::Read::read_exact(&mut out, &mut first).expect("container said ready");
    assert_eq!(&first, b"ready\n");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(rest, "got-term\n");
    assert_eq!(status.code(), Some(42));
    env.assert_no_leaks();
}

#[test]
fn vm_killed_qemu_is_reported_and_cleaned_up() {
    let _leaks = LeakGuard::new();
    let env = Env::new("qemukill");
    let b = Bundle::busybox(&["sh", "-c", "echo ready; sleep 1000"]);
    let mut c = env.husk();
    c.arg("run").arg("--bundle").arg(b.dir()).arg("victim");
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut first = [0u8; 6];
    std::io::Read::read_exact(&mut out, &mut first).expect("container said ready");
    let qemu = processes_mentioning("husk-victim")
        .into_iter()
        .find(|(_, cmd)| cmd.contains("qemu-system"))
        .expect("the VM's qemu process");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(qemu.0 as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let o = child.wait_with_output().unwrap();
    assert_ne!(o.status.code(), Some(0));
    let err = stderr(&o);
    assert!(err.contains("the VM died"), "stderr: {err}");
    assert!(err.contains("signal 9"), "stderr: {err}");
    env.assert_no_leaks();
}

#[test]
fn vm_ten_runs_in_a_row_leave_nothing() {
    let _leaks = LeakGuard::new();
    let env = Env::new("ten");
    let b = Bundle::busybox(&["true"]);
    for i in 0..10 {
        let o = env.run(&b, &format!("run{i}"), b"");
        assert_exit(&o, 0);
        env.assert_no_leaks();
    }
}

#[test]
fn vm_exec_of_a_missing_binary_is_a_clear_error() {
    let _leaks = LeakGuard::new();
    let env = Env::new("noexec");
    let b = Bundle::busybox(&["/no/such/binary"]);
    let o = env.run(&b, "noexec", b"");
    assert_ne!(o.status.code(), Some(0));
    assert!(
        stderr(&o).contains("/no/such/binary"),
        "stderr: {}",
        stderr(&o)
    );
    env.assert_no_leaks();
}

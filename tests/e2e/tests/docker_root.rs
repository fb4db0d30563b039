//! Docker driving husk: a private dockerd 20.10 per test (Debian's
//! `docker.io`, in a network namespace of its own, exec-root as long as
//! Docker's default), `docker run --runtime husk --network none`, real VMs
//! under TCG. Also the CLI under a `--root` and id as long as Docker's.
//! Root only. See docs/docker.md.

use std::path::Path;
use std::time::Duration;

use husk_e2e::docker::Dockerd;
use husk_e2e::*;

/// A `--root` of exactly 100 bytes below `dir`.
fn root_of_100(dir: &Path) -> std::path::PathBuf {
    let prefix = dir.join("root-");
    let pad = 100 - prefix.as_os_str().len();
    let root = dir.join(format!("root-{}", "r".repeat(pad)));
    assert_eq!(root.as_os_str().len(), 100);
    root
}

#[test]
fn cli_works_with_a_64_character_id_under_a_100_character_root() {
    let _leaks = LeakGuard::new();
    let env = Env::new("longroot");
    let root = root_of_100(env.dir.path());
    std::fs::create_dir_all(&root).unwrap();
    leak::own(&root);
    let id = format!("{:0>64}", format!("husk{}", std::process::id()));
    assert_eq!(id.len(), 64);
    let sock = root.join(&id).join("virtiofsd.sock");
    assert!(
        sock.as_os_str().len() > 107,
        "{} must not fit sun_path",
        sock.display()
    );
    let husk = |args: &[&str]| {
        let mut c = std::process::Command::new(husk_bin());
        c.arg("--root")
            .arg(&root)
            .arg("--config")
            .arg(&env.config)
            .args(args);
        run_timeout(c, Duration::from_secs(180))
    };

    // Foreground run: every socket (QMP, agent, virtiofsd, monitor) is
    // under <root>/<id>/.
    let b = Bundle::busybox(&["uname", "-r"]);
    let o = husk(&["run", "--bundle", &b.dir().to_string_lossy(), &id]);
    assert_exit(&o, 0);
    assert_eq!(stdout(&o).trim(), guest_release());

    // The clients of the monitor's socket: create, start, state, exec,
    // kill, delete.
    let b = Bundle::busybox(&["sleep", "1000"]);
    let mut c = std::process::Command::new(husk_bin());
    c.arg("--root")
        .arg(&root)
        .arg("--config")
        .arg(&env.config)
        .args(["create", "--bundle"])
        .arg(b.dir())
        .arg(&id);
    let o = run_to_files(c, &env.dir.path().join("create"), Duration::from_secs(180));
    assert_exit(&o, 0);
    assert_exit(&husk(&["start", &id]), 0);
    let o = husk(&["state", &id]);
    assert_exit(&o, 0);
    let state: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(state["status"], "running", "{state}");
    let o = husk(&["exec", &id, "sh", "-c", "echo in-$((40+2)); exit 5"]);
    assert_exit(&o, 5);
    assert_eq!(stdout(&o).trim(), "in-42");
    assert_exit(&husk(&["kill", &id, "KILL"]), 0);
    wait_until(Duration::from_secs(60), "the container to stop", || {
        let o = husk(&["state", &id]);
        serde_json::from_slice::<serde_json::Value>(&o.stdout)
            .map(|s| s["status"] == "stopped")
            .unwrap_or(false)
    });
    assert_exit(&husk(&["delete", &id]), 0);
    assert!(!root.join(&id).exists(), "state dir removed");
    env.assert_no_leaks();
}

#[test]
fn docker_run_kernel_exit_codes_stdin_loopback() {
    let _leaks = LeakGuard::new();
    let d = Dockerd::start("run");
    let o = d.run(&["--rm"], &["uname", "-r"]);
    assert_exit(&o, 0);
    assert_eq!(
        stdout(&o).trim(),
        guest_release(),
        "the guest kernel answers"
    );

    let o = d.run(&["--rm"], &["sh", "-c", "exit 7"]);
    assert_exit(&o, 7);

    let mut c = d.docker();
    c.args([
        "run",
        "--rm",
        "-i",
        "--runtime",
        "husk",
        "--network",
        "none",
        docker::IMAGE,
        "sh",
        "-c",
        "tr a-z A-Z; echo done",
    ]);
    let o = run_with_input(c, b"from stdin\n", docker::DOCKER_TIMEOUT);
    assert_exit(&o, 0);
    assert_eq!(stdout(&o), "FROM STDIN\ndone\n");

    // --network none: loopback is up and answers.
    let o = d.run(
        &["--rm"],
        &[
            "sh",
            "-c",
            "ip -o link show lo; nc -l -p 8080 -e echo pong & sleep 1; nc 127.0.0.1 8080 </dev/null",
        ],
    );
    assert_exit(&o, 0);
    let out = stdout(&o);
    let first = out.lines().next().unwrap_or("");
    assert!(first.contains("<LOOPBACK,UP,LOWER_UP>"), "{out}");
    assert!(out.contains("pong"), "{out}");
    d.assert_clean();
}

#[test]
fn docker_run_on_a_terminal() {
    let _leaks = LeakGuard::new();
    let d = Dockerd::start("tty");
    let (out, code) = d.run_on_terminal(
        &[
            "run",
            "--rm",
            "-t",
            "--runtime",
            "husk",
            "--network",
            "none",
            docker::IMAGE,
            "sh",
            "-c",
            "'[ -t 1 ] && echo on-a-tty; tty; exit 4'",
        ],
        b"",
        Duration::ZERO,
    );
    assert_eq!(code, Some(4), "{out}");
    assert!(out.contains("on-a-tty"), "{out}");
    assert!(out.contains("/dev/pts/"), "{out}");

    let (out, code) = d.run_on_terminal(
        &[
            "run",
            "--rm",
            "-it",
            "--runtime",
            "husk",
            "--network",
            "none",
            docker::IMAGE,
            "sh",
        ],
        b"echo IT-$((6*7))\rexit 3\r",
        Duration::from_secs(3),
    );
    assert_eq!(code, Some(3), "{out}");
    assert!(out.contains("IT-42"), "{out}");
    d.assert_clean();
}

/// The first number of `docker stats`' memory usage ("119MiB / 768MiB"),
/// in MiB.
fn mem_mib(usage: &str) -> f64 {
    let used = usage.split('/').next().unwrap().trim();
    let split = used
        .find(|c: char| c.is_ascii_alphabetic())
        .unwrap_or(used.len());
    let (n, unit) = used.split_at(split);
    let n: f64 = n.parse().unwrap_or_else(|_| panic!("usage {usage:?}"));
    n * match unit {
        "B" => 1.0 / (1024.0 * 1024.0),
        "KiB" | "kB" => 1.0 / 1024.0,
        "MiB" | "MB" => 1.0,
        "GiB" | "GB" => 1024.0,
        u => panic!("unit {u:?} in {usage:?}"),
    }
}

#[test]
fn docker_detached_exec_stats_rm() {
    let _leaks = LeakGuard::new();
    let d = Dockerd::start("exec");
    let id = d.ok(&[
        "run",
        "-d",
        "--runtime",
        "husk",
        "--network",
        "none",
        "-m",
        "128m",
        docker::IMAGE,
        "sleep",
        "1000",
    ]);
    d.remember(&id);
    assert_eq!(id.len(), 64, "{id}");

    let o = d.cmd(&["exec", &id, "sh", "-c", "echo exec-$((2*21)); exit 4"]);
    assert_exit(&o, 4);
    assert_eq!(stdout(&o).trim(), "exec-42");
    let o = d.cmd_with_input(&["exec", "-i", &id, "cat"], b"piped\n");
    assert_exit(&o, 0);
    assert_eq!(stdout(&o), "piped\n");

    let (out, code) = d.run_on_terminal(
        &["exec", "-it", &id, "sh"],
        b"echo EIT-$((5*5))\rexit 6\r",
        Duration::from_secs(3),
    );
    assert_eq!(code, Some(6), "{out}");
    assert!(out.contains("EIT-25"), "{out}");

    // The sandbox's host cgroup: QEMU's and virtiofsd's memory, far above
    // what a bare monitor uses.
    let usage = d.ok(&["stats", "--no-stream", "--format", "{{.MemUsage}}", &id]);
    let mib = mem_mib(&usage);
    eprintln!("docker stats: {usage}");
    assert!(mib > 20.0, "docker stats memory {usage}");

    let pid: i32 = d
        .ok(&["inspect", "-f", "{{.State.Pid}}", &id])
        .parse()
        .unwrap();
    assert!(alive(pid), "the pid Docker has is the monitor's");
    d.ok(&["rm", "-f", &id]);
    wait_until(Duration::from_secs(60), "the monitor to exit", || {
        !alive(pid)
    });
    d.assert_clean();
}

#[test]
fn docker_oom_in_the_guest_is_137() {
    let _leaks = LeakGuard::new();
    let d = Dockerd::start("oom");
    let o = d.run(
        &["--name", "hkd-oom", "-m", "64m"],
        &["sh", "-c", "x=a; while true; do x=$x$x; done"],
    );
    assert_exit(&o, 137);
    let oom = d.ok(&[
        "inspect",
        "-f",
        "{{.State.OOMKilled}} {{.State.ExitCode}}",
        "hkd-oom",
    ]);
    // Docker hears of an OOM kill only from the host cgroup of the pid the
    // runtime reports; the guest's kill is not one (docs/docker.md).
    assert_eq!(oom, "false 137", "update docs/docker.md if this changed");
    d.ok(&["rm", "hkd-oom"]);
    d.assert_clean();
}

#[test]
fn docker_logs_stop_restart_pause_volume() {
    let _leaks = LeakGuard::new();
    let d = Dockerd::start("life");
    let vol = TempDir::new("docker-vol");
    let v = format!("{}:/data", vol.path().display());
    // A process that ignores SIGTERM: `docker stop` must end it (SIGKILL
    // after -t seconds).
    let id = d.ok(&[
        "run",
        "-d",
        "--runtime",
        "husk",
        "--network",
        "none",
        "-v",
        &v,
        docker::IMAGE,
        "sh",
        "-c",
        "trap '' TERM; echo started >> /data/log; echo to-logs; while true; do sleep 1; done",
    ]);
    d.remember(&id);
    wait_until(
        Duration::from_secs(60),
        "the container's first line",
        || {
            std::fs::read_to_string(vol.path().join("log"))
                .map(|s| s.contains("started"))
                .unwrap_or(false)
        },
    );
    let logs = d.cmd(&["logs", &id]);
    assert_exit(&logs, 0);
    assert!(stdout(&logs).contains("to-logs"), "{}", stdout(&logs));

    d.ok(&["pause", &id]);
    assert_eq!(d.ok(&["inspect", "-f", "{{.State.Status}}", &id]), "paused");
    d.ok(&["unpause", &id]);
    assert_eq!(
        d.ok(&["inspect", "-f", "{{.State.Status}}", &id]),
        "running"
    );

    let t0 = std::time::Instant::now();
    d.ok(&["stop", "-t", "2", &id]);
    eprintln!("docker stop of a TERM-ignoring process: {:?}", t0.elapsed());
    assert_eq!(d.ok(&["inspect", "-f", "{{.State.ExitCode}}", &id]), "137");

    d.ok(&["restart", "-t", "2", &id]);
    assert_eq!(
        d.ok(&["inspect", "-f", "{{.State.Status}}", &id]),
        "running"
    );
    wait_until(
        Duration::from_secs(60),
        "the restarted container's line",
        || {
            std::fs::read_to_string(vol.path().join("log"))
                .map(|s| s.matches("started").count() == 2)
                .unwrap_or(false)
        },
    );
    d.ok(&["rm", "-f", &id]);
    d.assert_clean();
}

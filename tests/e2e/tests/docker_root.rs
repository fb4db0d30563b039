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

    // The container's processes, as docs/docker.md advises instead of
    // `docker top`: `docker exec ID ps` and husk's own `ps`.
    let ps = d.ok(&["exec", &id, "ps"]);
    assert!(ps.contains("sleep 1000"), "{ps}");
    let mut c = std::process::Command::new(husk_bin());
    c.arg("--root").arg(d.runtime_root()).args(["ps", &id]);
    let o = run_timeout(c, docker::DOCKER_TIMEOUT);
    assert_exit(&o, 0);
    assert!(stdout(&o).contains("sleep 1000"), "{}", stdout(&o));
    // `docker top` itself: husk's clear error (the guest's pids would name
    // unrelated host processes), not a wrong list.
    let top = d.cmd(&["top", &id]);
    assert!(!top.status.success(), "docker top: {}", stdout(&top));
    assert!(stderr(&top).contains("run in its VM"), "{}", stderr(&top));

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

/// busybox httpd on port 8080 serving a page that says `husk-docker-ok`.
const HTTPD: &str =
    "mkdir -p /www && echo husk-docker-ok > /www/index.html && exec httpd -f -p 8080 -h /www";

/// An HTTP GET from the daemon's namespace (busybox `nc`: the host has no
/// `nc`, and busybox-static's `wget` crashes on non-loopback addresses).
fn get(d: &Dockerd, addr: &str, port: u16) -> String {
    let o = d.netns_sh(&format!(
        "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 5 {addr} {port}"
    ));
    stdout(&o)
}

/// Waits until the page is served at `addr:port` from the daemon's
/// namespace.
fn served(d: &Dockerd, addr: &str, port: u16) {
    wait_until(
        Duration::from_secs(90),
        &format!("httpd answering on {addr}:{port}"),
        || get(d, addr, port).contains("husk-docker-ok"),
    );
}

/// `docker run -d` of [`HTTPD`] on `network` with `opts`; its id.
fn httpd(d: &Dockerd, network: &str, opts: &[&str]) -> String {
    let mut args = vec!["run", "-d", "--runtime", "husk", "--network", network];
    args.extend_from_slice(opts);
    args.extend_from_slice(&[docker::IMAGE, "sh", "-c", HTTPD]);
    let id = d.ok(&args);
    d.remember(&id);
    id
}

/// What husk could leave in the daemon's namespace and in the container's
/// (Docker's sandbox key, while it exists).
fn traces(d: &Dockerd, sandbox_key: &Path) -> Vec<String> {
    let mut t = husk_testutil::netns::husk_traces_in(&d.netns_path());
    if sandbox_key.exists() {
        t.extend(husk_testutil::netns::husk_traces_in(sandbox_key));
    }
    t
}

#[test]
fn docker_default_bridge_address_mac_publish_and_rm() {
    let _leaks = LeakGuard::new();
    let d = Dockerd::start_with_bridge("bridge");
    let id = httpd(
        &d,
        "bridge",
        &["--name", "hkd-bweb", "-p", "127.0.0.1:18080:8080"],
    );
    let inspect = d.ok(&[
        "inspect",
        "-f",
        "{{.NetworkSettings.IPAddress}} {{.NetworkSettings.MacAddress}} {{.NetworkSettings.SandboxKey}}",
        &id,
    ]);
    eprintln!("docker inspect: {inspect}");
    let mut it = inspect.split(' ');
    let (ip, mac, key) = (
        it.next().unwrap_or_default(),
        it.next().unwrap_or_default(),
        Path::new(it.next().unwrap_or_default()).to_path_buf(),
    );
    assert!(!ip.is_empty() && !mac.is_empty(), "{inspect}");
    // The container's network namespace on the host is the monitor's own:
    // neither the daemon's nor the host's (Docker's hook configured
    // /proc/PID/ns/net).
    let pid = d.ok(&["inspect", "-f", "{{.State.Pid}}", &id]);
    let ns_of = |p: &str| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).map(|m| m.ino()).unwrap()
    };
    let own = ns_of(&format!("/proc/{pid}/ns/net"));
    assert_ne!(own, ns_of(&d.netns_path().to_string_lossy()), "daemon's");
    assert_ne!(own, ns_of("/proc/self/ns/net"), "the test's (host's)");
    assert_eq!(own, ns_of(&key.to_string_lossy()), "Docker's sandbox key");
    assert!(
        !traces(&d, &key).is_empty(),
        "the container's namespace ({}) carries husk's tap while it runs",
        key.display()
    );

    // eth0 in the container (in the VM) has what Docker recorded.
    let addr = d.ok(&["exec", &id, "ip", "-o", "addr", "show", "eth0"]);
    assert!(addr.contains(&format!("{ip}/")), "{addr} lacks {ip}");
    let guest_mac = d.ok(&["exec", &id, "cat", "/sys/class/net/eth0/address"]);
    assert_eq!(guest_mac, mac);
    assert_eq!(d.ok(&["exec", &id, "uname", "-r"]), guest_release());
    let route = d.ok(&["exec", &id, "ip", "route"]);
    assert!(route.contains("default via"), "{route}");

    // Published on 127.0.0.1 of the daemon's namespace (docker-proxy), and
    // reached by address over docker0.
    served(&d, "127.0.0.1", 18080);
    served(&d, ip, 8080);
    // From another container on docker0 (its own VM), by the name
    // `--link` puts in its /etc/hosts (no `--network`: Docker 20.10's
    // client refuses links with an explicit one).
    let o = d.run_on(
        "",
        &["--rm", "--link", "hkd-bweb:web"],
        &[
            "sh",
            "-c",
            "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 10 web 8080",
        ],
    );
    assert_exit(&o, 0);
    assert!(stdout(&o).contains("husk-docker-ok"), "{}", stdout(&o));

    // A restart is a new create: a new monitor in a new namespace, which
    // Docker's hook configures again.
    d.ok(&["restart", "-t", "1", &id]);
    let pid2 = d.ok(&["inspect", "-f", "{{.State.Pid}}", &id]);
    assert_ne!(pid, pid2, "a new monitor");
    served(&d, "127.0.0.1", 18080);
    let ip2 = d.ok(&["inspect", "-f", "{{.NetworkSettings.IPAddress}}", &id]);
    let addr = d.ok(&["exec", &id, "ip", "-o", "addr", "show", "eth0"]);
    assert!(addr.contains(&format!("{ip2}/")), "{addr} lacks {ip2}");
    let key =
        Path::new(&d.ok(&["inspect", "-f", "{{.NetworkSettings.SandboxKey}}", &id])).to_path_buf();

    d.ok(&["rm", "-f", &id]);
    d.assert_clean();
    assert_eq!(traces(&d, &key), Vec::<String>::new());
    assert!(
        !get(&d, "127.0.0.1", 18080).contains("husk-docker-ok"),
        "nothing answers once removed"
    );
}

#[test]
fn docker_user_defined_bridge_connects_containers() {
    let _leaks = LeakGuard::new();
    let d = Dockerd::start_with_bridge("userbr");
    d.ok(&["network", "create", "hkd-net"]);
    let id = httpd(&d, "hkd-net", &["--name", "hkd-web"]);
    let ip = d.ok(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        &id,
    ]);
    assert!(!ip.is_empty(), "no address on hkd-net");
    served(&d, &ip, 8080);
    // From another container on the network (its own VM): by address ...
    let o = d.run_on(
        "hkd-net",
        &["--rm"],
        &[
            "sh",
            "-c",
            &format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 10 {ip} 8080"),
        ],
    );
    assert_exit(&o, 0);
    assert!(stdout(&o).contains("husk-docker-ok"), "{}", stdout(&o));
    // ... and by a name in /etc/hosts (`--add-host`).
    let o = d.run_on(
        "hkd-net",
        &["--rm", "--add-host", &format!("hkd-web-host:{ip}")],
        &[
            "sh",
            "-c",
            "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 10 hkd-web-host 8080",
        ],
    );
    assert_exit(&o, 0);
    assert!(stdout(&o).contains("husk-docker-ok"), "{}", stdout(&o));

    // Not by a name only Docker's embedded DNS knows: the container's
    // resolv.conf says 127.0.0.11, where dockerd serves in the container's
    // network namespace on the host (a socket on 127.0.0.11 and a DNAT rule
    // to it, both there), but in the VM 127.0.0.11 is the guest's own
    // loopback, where nothing listens (docs/docker.md).
    let key = d.ok(&["inspect", "-f", "{{.NetworkSettings.SandboxKey}}", &id]);
    let on_host = d.netns_sh(&format!(
        "nsenter --net={key} -- ss -lnu; nsenter --net={key} -- iptables -t nat -S"
    ));
    let on_host = stdout(&on_host);
    eprintln!("the container's namespace on the host:\n{on_host}");
    assert!(
        on_host.contains("127.0.0.11:") && on_host.contains("--to-destination 127.0.0.11:"),
        "Docker's resolver in the container's host namespace: {on_host}"
    );
    let o = d.run_on(
        "hkd-net",
        &["--rm"],
        &[
            "sh",
            "-c",
            "grep nameserver /etc/resolv.conf; nslookup hkd-web",
        ],
    );
    let out = format!("{}{}", stdout(&o), stderr(&o));
    eprintln!("by Docker's DNS: {out}");
    assert!(out.contains("nameserver 127.0.0.11"), "{out}");
    assert!(
        !o.status.success() && out.contains("127.0.0.11"),
        "hkd-web resolved through Docker's DNS in the VM: update docs/docker.md: {out}"
    );
    d.ok(&["rm", "-f", &id]);
    d.ok(&["network", "rm", "hkd-net"]);
    d.assert_clean();
    assert_eq!(
        husk_testutil::netns::husk_traces_in(&d.netns_path()),
        Vec::<String>::new()
    );
}

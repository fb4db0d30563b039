//! podman with `--runtime <husk>`, as root, booting real VMs (QEMU under
//! TCG): every container in its own VM, driven the way podman and conmon
//! really drive a runtime.
//!
//! The cases share one podman setup and one image (see `husk_e2e::podman`),
//! and once they have all run, the whole suite is checked for leftovers: no
//! QEMU, virtiofsd, monitor or conmon naming any container of the suite, no
//! mount, no state dir. That needs a step after the last case, so this file
//! has its own small runner (`harness = false`) instead of libtest's: it
//! takes libtest's usual arguments (name filters, `--exact`, `--list`,
//! `--test-threads N`) and prints libtest-like lines.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use husk_e2e::console::{is_pts_name, tty_line};
use husk_e2e::podman::{Podman, Runtime, IMAGE, PODMAN_TIMEOUT};
use husk_e2e::*;

type Case = (&'static str, fn(&Podman));

const CASES: &[Case] = &[
    ("run_prints_the_guest_kernel", run_prints_the_guest_kernel),
    ("run_exit_status", run_exit_status),
    ("run_missing_program_is_127", run_missing_program_is_127),
    (
        "run_env_workdir_user_hostname",
        run_env_workdir_user_hostname,
    ),
    ("run_read_only_rootfs", run_read_only_rootfs),
    (
        "run_volume_write_reaches_host",
        run_volume_write_reaches_host,
    ),
    ("run_interactive_stdin", run_interactive_stdin),
    ("run_tty", run_tty),
    (
        "detached_logs_exec_ps_pause_stop",
        detached_logs_exec_ps_pause_stop,
    ),
    ("stop_kills_after_the_timeout", stop_kills_after_the_timeout),
    ("kill_signals_then_rm", kill_signals_then_rm),
    ("exec_tty_and_rm_force", exec_tty_and_rm_force),
    (
        "network_none_serves_on_loopback",
        network_none_serves_on_loopback,
    ),
    ("network_host_is_refused", network_host_is_refused),
    ("stats_are_the_vms", stats_are_the_vms),
];

// ---- helpers

fn out(o: &std::process::Output) -> String {
    stdout(o)
}

/// `podman ARGS` must succeed; returns its stdout.
fn ok(p: &Podman, args: &[&str]) -> String {
    let o = p.cmd(args);
    assert_exit(&o, 0);
    out(&o)
}

/// Starts a detached container running `script`; returns its id.
fn detached(p: &Podman, name: &str, script: &str) -> String {
    let (o, id) = p.run(&["-d", "--name", name, IMAGE, "sh", "-c", script]);
    assert_exit(&o, 0);
    let id = id.expect("podman wrote the container id");
    assert_eq!(out(&o).trim(), id);
    id
}

/// Waits until the container's log contains `needle`.
fn wait_for_log(p: &Podman, id: &str, needle: &str) {
    let mut last = String::new();
    let seen = try_wait_until(Duration::from_secs(60), || {
        let o = p.cmd(&["logs", id]);
        last = format!("{}{}", out(&o), stderr(&o));
        last.contains(needle)
    })
    .is_some();
    assert!(seen, "{needle:?} never appeared in the log of {id}: {last}");
}

/// The container's status as `podman ps -a` shows it.
fn ps_status(p: &Podman, id: &str) -> String {
    ok(
        p,
        &[
            "ps",
            "-a",
            "--filter",
            &format!("id={id}"),
            "--format",
            "{{.Status}}",
        ],
    )
    .trim()
    .to_string()
}

/// `podman wait`: the container's exit code once it has stopped.
fn wait_exit(p: &Podman, id: &str) -> i32 {
    ok(p, &["wait", id]).trim().parse().expect("exit code")
}

// ---- cases

/// `--network none`: the container has `lo`, up, and nothing else; a server
/// bound to 127.0.0.1 (busybox httpd, as in issue 10) answers a client in
/// the same container.
fn network_none_serves_on_loopback(p: &Podman) {
    let script = "ls /sys/class/net; ip addr show lo; \
                  mkdir -p /tmp/www && echo hello-from-lo > /tmp/www/index.html; \
                  httpd -f -p 127.0.0.1:8080 -h /tmp/www & \
                  for i in $(seq 100); do \
                    printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc 127.0.0.1 8080 && exit 0; \
                    sleep 0.1; \
                  done; exit 1";
    let (o, id) = p.run(&["--rm", IMAGE, "sh", "-c", script]);
    assert_exit(&o, 0);
    let text = out(&o);
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("lo"), "only lo: {text}");
    assert!(text.contains("<LOOPBACK,UP,LOWER_UP>"), "{text}");
    assert!(text.contains("inet 127.0.0.1/8"), "{text}");
    assert!(text.contains("200 OK"), "{text}");
    assert!(text.contains("hello-from-lo"), "{text}");
    p.assert_container_gone(&id.unwrap());
}

/// `--network host`: one clear error that says why and what instead.
fn network_host_is_refused(p: &Podman) {
    let cidfile = p.cidfile();
    let mut c = p.podman();
    c.args([
        "run",
        "--rm",
        "--pull=never",
        "--network",
        "host",
        "--cidfile",
    ])
    .arg(&cidfile)
    .args([IMAGE, "true"]);
    let o = run_with_input(c, b"", PODMAN_TIMEOUT);
    let id = p.record(&cidfile);
    assert_ne!(o.status.code(), Some(0), "{}", out(&o));
    let err = stderr(&o);
    assert!(
        err.contains("cannot share the host's network stack"),
        "{err}"
    );
    assert!(err.contains("--network none"), "{err}");
    if let Some(id) = id {
        // podman may keep the container record of a failed --rm run.
        let _ = p.cmd(&["rm", "-f", &id]);
        p.assert_container_gone(&id);
    }
}

fn run_prints_the_guest_kernel(p: &Podman) {
    let (o, id) = p.run(&["--rm", IMAGE, "uname", "-r"]);
    assert_exit(&o, 0);
    assert_eq!(out(&o).trim(), guest_release());
    let host = std::process::Command::new("uname")
        .arg("-r")
        .output()
        .unwrap();
    assert_ne!(
        out(&o).trim(),
        stdout(&host).trim(),
        "ran on the host kernel"
    );
    p.assert_container_gone(&id.unwrap());
}

fn run_exit_status(p: &Podman) {
    let (o, id) = p.run(&["--rm", IMAGE, "sh", "-c", "echo bye; exit 7"]);
    assert_exit(&o, 7);
    assert_eq!(out(&o), "bye\n");
    p.assert_container_gone(&id.unwrap());
}

fn run_missing_program_is_127(p: &Podman) {
    // husk's error reaches podman (through the --log file, in runc's JSON)
    // and podman maps it to 127, as for runc.
    let (o, id) = p.run(&["--rm", IMAGE, "/no/such/program"]);
    assert_exit(&o, 127);
    let err = stderr(&o);
    assert!(err.contains("/no/such/program"), "{err}");
    assert_eq!(
        err.matches("/no/such/program").count(),
        1,
        "said once: {err}"
    );
    if let Some(id) = id {
        p.assert_container_gone(&id);
    }
}

fn run_env_workdir_user_hostname(p: &Podman) {
    let (o, id) = p.run(&[
        "--rm",
        "-e",
        "GREETING=hello from podman",
        "-w",
        "/tmp",
        "--user",
        "1000:1000",
        "--hostname",
        "husk-podman",
        IMAGE,
        "sh",
        "-c",
        "echo $GREETING; pwd; id -u; id -g; hostname",
    ]);
    assert_exit(&o, 0);
    assert_eq!(
        out(&o),
        "hello from podman\n/tmp\n1000\n1000\nhusk-podman\n"
    );
    p.assert_container_gone(&id.unwrap());
}

fn run_read_only_rootfs(p: &Podman) {
    let (o, id) = p.run(&[
        "--rm",
        "--read-only",
        IMAGE,
        "sh",
        "-c",
        "touch /x 2>&1; echo rc=$?; touch /tmp/y && echo tmp-writable",
    ]);
    assert_exit(&o, 0);
    let text = out(&o);
    assert!(text.contains("Read-only file system"), "{text}");
    assert!(text.contains("rc=1\n"), "{text}");
    // podman mounts a tmpfs on /tmp of a read-only container.
    assert!(text.contains("tmp-writable\n"), "{text}");
    p.assert_container_gone(&id.unwrap());
}

fn run_volume_write_reaches_host(p: &Podman) {
    let data = TempDir::new("podman-vol");
    std::fs::write(data.path().join("in.txt"), "from the host\n").unwrap();
    let vol = format!("{}:/data", data.path().display());
    let (o, id) = p.run(&[
        "--rm",
        "-v",
        &vol,
        IMAGE,
        "sh",
        "-c",
        "cat /data/in.txt && uname -r > /data/out.txt",
    ]);
    assert_exit(&o, 0);
    assert_eq!(out(&o), "from the host\n");
    assert_eq!(
        std::fs::read_to_string(data.path().join("out.txt")).unwrap(),
        format!("{}\n", guest_release())
    );
    p.assert_container_gone(&id.unwrap());
}

fn run_interactive_stdin(p: &Podman) {
    let (o, id) = p.run_with(
        Runtime::Husk,
        &["--rm", "-i", IMAGE, "sh", "-c", "cat; echo end-of-input"],
        b"line one\nline two\n",
    );
    assert_exit(&o, 0);
    assert_eq!(out(&o), "line one\nline two\nend-of-input\n");
    p.assert_container_gone(&id.unwrap());
}

fn run_tty(p: &Podman) {
    let (o, id) = p.run(&[
        "--rm",
        "-t",
        IMAGE,
        "sh",
        "-c",
        "test -t 0 && test -t 1 && echo is-a-tty; echo tty=$(tty); exit 3",
    ]);
    assert_exit(&o, 3);
    // Through a pty, lines end in \r\n.
    let text = out(&o).replace('\r', "");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.first(), Some(&"is-a-tty"), "{text:?}");
    // The pty comes from the container's own devpts, so it has a name there
    // (issue #3: it used to be /dev/console).
    assert!(tty_line(&text).is_some_and(is_pts_name), "{text:?}");
    p.assert_container_gone(&id.unwrap());
}

fn detached_logs_exec_ps_pause_stop(p: &Podman) {
    let id = detached(
        p,
        "husk-e2e-detached",
        "trap 'echo got-term; exit 42' TERM; echo ready; \
         i=0; while true; do i=$((i+1)); echo $i > /tmp/ticks; sleep 0.1; done",
    );
    wait_for_log(p, &id, "ready");
    // `podman ps` lists it as running.
    let running = ok(p, &["ps", "--no-trunc", "--format", "{{.ID}} {{.Status}}"]);
    assert!(
        running
            .lines()
            .any(|l| l.starts_with(&id) && l.contains(" Up ")),
        "not running in `podman ps`: {running}"
    );
    // exec: output, stderr and the exit code.
    let o = p.cmd(&[
        "exec",
        &id,
        "sh",
        "-c",
        "uname -r; echo to-stderr >&2; exit 5",
    ]);
    assert_exit(&o, 5);
    assert_eq!(out(&o), format!("{}\n", guest_release()));
    assert!(stderr(&o).contains("to-stderr"), "{}", stderr(&o));
    // exec with piped stdin.
    let mut c = p.podman();
    c.args(["exec", "-i", &id, "sh", "-c", "cat; echo done"]);
    let o = run_with_input(c, b"via stdin\n", PODMAN_TIMEOUT);
    assert_exit(&o, 0);
    assert_eq!(out(&o), "via stdin\ndone\n");
    // exec as another user, in another directory, with more environment.
    let o = p.cmd(&[
        "exec",
        "--user",
        "1000:1000",
        "-w",
        "/tmp",
        "-e",
        "X=y",
        &id,
        "sh",
        "-c",
        "id -u; pwd; echo $X",
    ]);
    assert_exit(&o, 0);
    assert_eq!(out(&o), "1000\n/tmp\ny\n");

    // pause freezes the whole VM; unpause lets it go on.
    ok(p, &["pause", &id]);
    assert_eq!(ps_status(p, &id), "Paused");
    ok(p, &["unpause", &id]);
    assert!(ps_status(p, &id).starts_with("Up"), "{}", ps_status(p, &id));
    let ticks = |p: &Podman| -> u64 {
        ok(p, &["exec", &id, "cat", "/tmp/ticks"])
            .trim()
            .parse()
            .unwrap_or(0)
    };
    let before = ticks(p);
    wait_until(
        Duration::from_secs(30),
        "the container to run on after unpause",
        || ticks(p) > before,
    );

    // stop: SIGTERM is honored (the trap's status, well before the timeout).
    let t = Instant::now();
    ok(p, &["stop", "--time", "120", &id]);
    assert!(
        t.elapsed() < Duration::from_secs(100),
        "stop waited for its timeout: SIGTERM was not delivered"
    );
    assert_eq!(wait_exit(p, &id), 42);
    wait_for_log(p, &id, "got-term");
    assert!(ps_status(p, &id).starts_with("Exited (42)"));
    ok(p, &["rm", &id]);
    p.assert_container_gone(&id);
}

fn stop_kills_after_the_timeout(p: &Podman) {
    // The init of a PID namespace ignores signals it has no handler for, and
    // this one ignores SIGTERM explicitly.
    let id = detached(
        p,
        "husk-e2e-stubborn",
        "trap '' TERM; echo ready; while true; do sleep 0.1; done",
    );
    wait_for_log(p, &id, "ready");
    let t = Instant::now();
    ok(p, &["stop", "--time", "2", &id]);
    let took = t.elapsed();
    assert!(took >= Duration::from_secs(2), "stop took only {took:?}");
    assert_eq!(wait_exit(p, &id), 137);
    ok(p, &["rm", &id]);
    p.assert_container_gone(&id);
}

/// `podman stats` reads the cgroup podman asked for, where the monitor put
/// QEMU and virtiofsd: it shows the VM's memory (tens of MiB), not a
/// sleeping shell's; the cgroup is bounded by the VM's size.
fn stats_are_the_vms(p: &Podman) {
    let id = detached(p, "husk-e2e-stats", "echo ready; exec sleep 100000");
    wait_for_log(p, &id, "ready");
    let o = ok(
        p,
        &["stats", "--no-stream", "--format", "{{.MemUsage}}", &id],
    );
    // "58.2MB / 671.1MB"
    let mib = |s: &str| -> f64 {
        let s = s.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let n: f64 = s[..split].parse().unwrap_or(0.0);
        match s[split..].trim() {
            "kB" | "KB" | "KiB" => n / 1024.0,
            "MB" | "MiB" => n,
            "GB" | "GiB" => n * 1024.0,
            _ => n / (1024.0 * 1024.0),
        }
    };
    let (used, _) = o.trim().split_once('/').expect("usage / limit");
    assert!(mib(used) > 20.0, "the VM's memory, not a shell's: {o}");
    // podman shows the host's RAM as the limit of a container without a
    // memory limit of its own; the cgroup itself holds the VM's bound.
    let pid = ok(p, &["inspect", "--format", "{{.State.Pid}}", &id]);
    let cgroups = std::fs::read_to_string(format!("/proc/{}/cgroup", pid.trim())).unwrap();
    let memory = cgroups
        .lines()
        .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()))
        .expect("a v1 memory cgroup");
    assert!(memory.contains(&id), "the container's own cgroup: {memory}");
    let limit: u64 = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/memory{memory}/memory.limit_in_bytes"
    ))
    .unwrap()
    .trim()
    .parse()
    .unwrap();
    assert!(
        limit < 4 << 30,
        "bounded by the VM's size plus overhead: {limit}"
    );
    ok(p, &["rm", "-f", &id]);
    p.assert_container_gone(&id);
}

fn kill_signals_then_rm(p: &Podman) {
    let id = detached(
        p,
        "husk-e2e-kill",
        "trap 'echo got-usr1' USR1; echo ready; while true; do sleep 0.1; done",
    );
    wait_for_log(p, &id, "ready");
    ok(p, &["kill", "--signal", "USR1", &id]);
    wait_for_log(p, &id, "got-usr1");
    assert!(ps_status(p, &id).starts_with("Up"));
    ok(p, &["kill", &id]);
    assert_eq!(wait_exit(p, &id), 137);
    ok(p, &["rm", &id]);
    let o = p.cmd(&["container", "exists", &id]);
    assert_exit(&o, 1);
    p.assert_container_gone(&id);
}

fn exec_tty_and_rm_force(p: &Podman) {
    let id = detached(p, "husk-e2e-exec-tty", "echo ready; exec sleep 100000");
    wait_for_log(p, &id, "ready");
    let o = p.cmd(&[
        "exec",
        "-t",
        &id,
        "sh",
        "-c",
        "test -t 0 && echo is-a-tty; echo tty=$(tty)",
    ]);
    assert_exit(&o, 0);
    let text = out(&o).replace('\r', "");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.first(), Some(&"is-a-tty"), "{text:?}");
    // As in run_tty: a terminal of the container's devpts (it used to be
    // "not a tty").
    assert!(tty_line(&text).is_some_and(is_pts_name), "{text:?}");
    let o = p.cmd(&["exec", "-t", &id, "sh", "-c", "exit 6"]);
    assert_exit(&o, 6);
    // rm --force of a running container stops it and removes every trace.
    ok(p, &["rm", "--force", "--time", "0", &id]);
    p.assert_container_gone(&id);
}

// ---- the runner

struct Options {
    filters: Vec<String>,
    exact: bool,
    list: bool,
    ignored: bool,
    threads: usize,
}

fn options() -> Options {
    let mut o = Options {
        filters: Vec::new(),
        exact: false,
        list: false,
        ignored: false,
        threads: 2,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--list" => o.list = true,
            "--exact" => o.exact = true,
            "--ignored" => o.ignored = true,
            "--test-threads" => {
                o.threads = args.next().and_then(|n| n.parse().ok()).unwrap_or(2);
            }
            // Flags that take a value; the value is not a filter.
            "--skip" | "--format" | "--color" | "--logfile" | "-Z" => {
                args.next();
            }
            _ if a.starts_with("--test-threads=") => {
                o.threads = a["--test-threads=".len()..].parse().unwrap_or(2);
            }
            _ if a.starts_with('-') => {}
            _ => o.filters.push(a),
        }
    }
    o.threads = o.threads.max(1);
    o
}

fn selected(o: &Options) -> Vec<Case> {
    if o.ignored {
        return Vec::new();
    }
    CASES
        .iter()
        .copied()
        .filter(|(name, _)| {
            o.filters.is_empty()
                || o.filters.iter().any(|f| {
                    if o.exact {
                        name == f
                    } else {
                        name.contains(f.as_str())
                    }
                })
        })
        .collect()
}

/// Runs `f` on a thread named `name`; Err if it panicked.
fn run_named(name: &str, f: impl FnOnce() + Send) -> Result<(), ()> {
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn_scoped(s, || {
                // Each case's own guard: its containers, watched by id.
                let _leaks = LeakGuard::new().with_grace(EXIT_GRACE);
                f()
            })
            .expect("spawn a test thread")
            .join()
            .map_err(|_| ())
    })
}

fn main() {
    let o = options();
    if o.list {
        for (name, _) in CASES {
            println!("{name}: test");
        }
        return;
    }
    let cases = selected(&o);
    println!(
        "\nrunning {} tests",
        cases.len() + usize::from(!cases.is_empty())
    );
    if cases.is_empty() {
        println!("\ntest result: ok. 0 passed; 0 failed; 0 ignored\n");
        return;
    }
    let start = Instant::now();
    // The suite's guard: the podman setup and, at the end, every container.
    let suite = LeakGuard::named("podman_root").with_grace(EXIT_GRACE);
    let setup = std::panic::catch_unwind(Podman::new);
    let podman = match setup {
        Ok(p) => p,
        Err(_) => {
            println!("test podman setup ... FAILED");
            std::process::exit(101);
        }
    };
    println!(
        "podman setup with image {IMAGE}: {:.1}s",
        start.elapsed().as_secs_f64()
    );
    let next = AtomicUsize::new(0);
    let failed = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..o.threads.min(cases.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some((name, case)) = cases.get(i) else {
                    return;
                };
                let t = Instant::now();
                let r = run_named(name, AssertUnwindSafe(|| case(&podman)));
                let verdict = if r.is_ok() { "ok" } else { "FAILED" };
                println!(
                    "test {name} ... {verdict} ({:.1}s)",
                    t.elapsed().as_secs_f64()
                );
                if r.is_err() {
                    failed.lock().unwrap().push(*name);
                }
            });
        }
    });
    // Once every case has run: nothing of the whole suite may be left.
    let t = Instant::now();
    let r = std::panic::catch_unwind(AssertUnwindSafe(move || {
        podman.finish();
        drop(suite);
    }))
    .map_err(drop);
    println!(
        "test leak_check_after_the_suite ... {} ({:.1}s)",
        if r.is_ok() { "ok" } else { "FAILED" },
        t.elapsed().as_secs_f64()
    );
    let mut failed = failed.into_inner().unwrap();
    if r.is_err() {
        failed.push("leak_check_after_the_suite");
    }
    let total = cases.len() + 1;
    if failed.is_empty() {
        println!(
            "\ntest result: ok. {total} passed; 0 failed; finished in {:.1}s\n",
            start.elapsed().as_secs_f64()
        );
    } else {
        println!("\nfailures:");
        for f in &failed {
            println!("    {f}");
        }
        println!(
            "\ntest result: FAILED. {} passed; {} failed; finished in {:.1}s\n",
            total - failed.len(),
            failed.len(),
            start.elapsed().as_secs_f64()
        );
        std::process::exit(101);
    }
}

//! The runc-compatible verbs without a manager in front, as root, booting
//! real VMs: create/start/state/kill/delete with the state checked after
//! each step, exec (exit codes, a pty through a console socket, detached
//! with a pid file), list, pause/resume, every error case (one clear
//! message, a non-zero exit, nothing changed), a monitor that was killed,
//! and the per-container lock.
//!
//! The test process makes itself a subreaper, as conmon is, so it can
//! collect the exit status of the processes husk leaves behind: the monitor
//! (the pid in `--pid-file`) must exit with the container's status, and a
//! detached exec's pid with the process's.

use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use husk_e2e::console::{is_pts_name, read_pty, tty_line, ConsoleSocket};
use husk_e2e::*;
use nix::fcntl::{Flock, FlockArg};
use serde_json::Value;

const T: Duration = Duration::from_secs(120);

/// `husk ARGS...` with captured output.
fn husk(env: &Env, args: &[&str]) -> Output {
    let mut c = env.husk();
    c.args(args);
    run_timeout(c, T)
}

/// A verb that leaves a process behind holding its stdio (`create` and
/// `run -d`: the monitor, whose stdio the container's is; `exec --detach`:
/// the pid standing for the process): that goes to `<envdir>/<id>.out` /
/// `.err`, so nobody waits for a pipe to close.
fn husk_leaving_monitor(env: &Env, id: &str, args: &[&OsStr]) -> Output {
    let mut c = env.husk();
    c.args(args);
    run_to_files(c, &env.dir.path().join(id), T)
}

fn container_output(env: &Env, id: &str) -> String {
    std::fs::read_to_string(env.dir.path().join(format!("{id}.out"))).unwrap_or_default()
}

fn create(env: &Env, b: &Bundle, id: &str, pid_file: Option<&Path>) -> Output {
    let mut args: Vec<&OsStr> = vec!["create".as_ref(), "--bundle".as_ref(), b.dir().as_os_str()];
    if let Some(p) = pid_file {
        args.extend(["--pid-file".as_ref(), p.as_os_str()]);
    }
    args.push(id.as_ref());
    husk_leaving_monitor(env, id, &args)
}

fn run_detached(env: &Env, b: &Bundle, id: &str) {
    let o = husk_leaving_monitor(
        env,
        id,
        &[
            "run".as_ref(),
            "-d".as_ref(),
            "--bundle".as_ref(),
            b.dir().as_os_str(),
            id.as_ref(),
        ],
    );
    assert_exit(&o, 0);
}

/// `husk state ID` as JSON.
fn state(env: &Env, id: &str) -> Value {
    let o = husk(env, &["state", id]);
    assert_exit(&o, 0);
    serde_json::from_slice(&o.stdout).expect("state prints JSON")
}

fn status(env: &Env, id: &str) -> String {
    state(env, id)["status"].as_str().unwrap().to_string()
}

fn wait_status(env: &Env, id: &str, want: &str) {
    let mut last = String::new();
    let ok = try_wait_until(T, || {
        last = status(env, id);
        last == want
    })
    .is_some();
    assert!(ok, "container {id} is {last}, expected {want}");
}

fn wait_output(env: &Env, id: &str, needle: &str) {
    let ok = try_wait_until(T, || container_output(env, id).contains(needle)).is_some();
    assert!(
        ok,
        "{needle:?} not in the output of {id}: {:?}",
        container_output(env, id)
    );
}

fn read_pid(path: &Path) -> i32 {
    std::fs::read_to_string(path)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid file holds a pid")
}

/// A container that runs until SIGTERM, which it answers with status 42.
fn term_42() -> Bundle {
    Bundle::busybox(&[
        "sh",
        "-c",
        "trap 'echo got-term; exit 42' TERM; echo ready; while true; do sleep 0.1; done",
    ])
}

#[test]
fn vm_create_start_state_kill_delete() {
    let _leaks = LeakGuard::new();
    become_subreaper();
    let env = Env::new("lifecycle");
    let b = term_42();
    let pid_file = env.dir.path().join("c.pid");

    let o = create(&env, &b, "c", Some(&pid_file));
    assert_exit(&o, 0);
    let s = state(&env, "c");
    assert_eq!(s["status"], "created");
    assert_eq!(s["id"], "c");
    assert_eq!(s["ociVersion"], "1.1.0");
    assert_eq!(Path::new(s["bundle"].as_str().unwrap()), b.dir());
    let pid = read_pid(&pid_file);
    assert_eq!(
        s["pid"].as_i64(),
        Some(pid as i64),
        "state pid = --pid-file"
    );
    assert!(alive(pid), "the monitor runs");
    assert!(
        !container_output(&env, "c").contains("ready"),
        "the process ran before start"
    );

    assert_exit(&husk(&env, &["start", "c"]), 0);
    assert_eq!(status(&env, "c"), "running");
    assert_eq!(state(&env, "c")["pid"].as_i64(), Some(pid as i64));
    wait_output(&env, "c", "ready");

    // kill: SIGTERM by default.
    assert_exit(&husk(&env, &["kill", "c"]), 0);
    wait_status(&env, "c", "stopped");
    wait_output(&env, "c", "got-term");
    // The monitor (conmon's "container pid") exits with the container's status.
    assert_eq!(wait_exit_status(pid, T), Some(42));
    let s = state(&env, "c");
    assert_eq!(s["pid"], 0);
    let o = husk(&env, &["kill", "c", "KILL"]);
    assert_one_line_error(&o, "stopped");

    assert_exit(&husk(&env, &["delete", "c"]), 0);
    assert!(!env.state_dir("c").exists());
    assert_one_line_error(&husk(&env, &["state", "c"]), "does not exist");
    env.assert_no_leaks();
}

#[test]
fn vm_create_with_a_terminal_through_the_console_socket() {
    let _leaks = LeakGuard::new();
    become_subreaper();
    let env = Env::new("tty");
    let mut b = Bundle::busybox(&[
        "sh",
        "-c",
        "test -t 0 && test -t 1 && echo is-a-tty; echo tty=$(tty); \
         [ /dev/console -ef $(tty) ] && echo console-is-the-tty; exit 3",
    ]);
    b.spec["process"]["terminal"] = serde_json::json!(true);
    b.save();
    let sock = ConsoleSocket::bind(&env.dir.path().join("console.sock"));
    let pid_file = env.dir.path().join("t.pid");
    let args: Vec<&OsStr> = vec![
        "create".as_ref(),
        "--bundle".as_ref(),
        b.dir().as_os_str(),
        "--console-socket".as_ref(),
        sock.path.as_os_str(),
        "--pid-file".as_ref(),
        pid_file.as_os_str(),
        "t".as_ref(),
    ];
    let mut c = env.husk();
    c.args(&args);
    let dir = env.dir.path().join("t");
    let created = std::thread::spawn(move || run_to_files(c, &dir, T));
    let pty = sock.receive(T);
    assert_exit(&created.join().unwrap(), 0);
    let pid = read_pid(&pid_file);
    // The container has its own terminal: the monitor, which outlives
    // `create`, holds none of the caller's stdio (a caller that reads its
    // output to the end, as containerd's runc shim does, is not held).
    for fd in 0..3 {
        let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
        assert_eq!(target, std::path::Path::new("/dev/null"), "monitor fd {fd}");
    }
    assert_exit(&husk(&env, &["start", "t"]), 0);
    let text = read_pty(pty.master, T);
    assert_eq!(wait_exit_status(pid, T), Some(3), "{text:?}");
    assert!(text.starts_with("is-a-tty\r\n"), "{text:?}");
    // In the guest, the init's terminal is one of the container's devpts,
    // and /dev/console is that terminal (issue #3: `tty` said /dev/console).
    assert!(tty_line(&text).is_some_and(is_pts_name), "{text:?}");
    assert!(text.contains("console-is-the-tty"), "{text:?}");
    assert_exit(&husk(&env, &["delete", "t"]), 0);
    env.assert_no_leaks();
}

#[test]
fn vm_delete_of_a_created_container() {
    let _leaks = LeakGuard::new();
    become_subreaper();
    let env = Env::new("delcreated");
    let b = term_42();
    let pid_file = env.dir.path().join("c.pid");
    assert_exit(&create(&env, &b, "c", Some(&pid_file)), 0);
    let pid = read_pid(&pid_file);
    assert_eq!(status(&env, "c"), "created");
    // As runc: a container that never started may be deleted without --force.
    assert_exit(&husk(&env, &["delete", "c"]), 0);
    assert!(wait_exit_status(pid, T).is_some(), "the monitor exited");
    assert!(
        !container_output(&env, "c").contains("ready"),
        "it never ran"
    );
    assert_one_line_error(&husk(&env, &["start", "c"]), "does not exist");
    env.assert_no_leaks();
}

#[test]
fn vm_exec_ps_pause_resume_events() {
    let _leaks = LeakGuard::new();
    become_subreaper();
    let env = Env::new("exec");
    let b = term_42();
    run_detached(&env, &b, "x");
    assert_eq!(status(&env, "x"), "running");

    // Output, stderr and the exit code.
    let o = husk(
        &env,
        &[
            "exec",
            "x",
            "sh",
            "-c",
            "uname -r; echo to-stderr >&2; exit 9",
        ],
    );
    assert_exit(&o, 9);
    assert_eq!(stdout(&o), format!("{}\n", guest_release()));
    assert_eq!(stderr(&o), "to-stderr\n");
    // The flags that change the process.
    let o = husk(
        &env,
        &[
            "exec",
            "--env",
            "X=y",
            "--cwd",
            "/tmp",
            "--user",
            "1000:1000",
            "x",
            "sh",
            "-c",
            "echo $X; pwd; id -u; id -g",
        ],
    );
    assert_exit(&o, 0);
    assert_eq!(stdout(&o), "y\n/tmp\n1000\n1000\n");
    // stdin reaches the process.
    let mut c = env.husk();
    c.args(["exec", "x", "sh", "-c", "cat; echo end"]);
    let o = run_with_input(c, b"piped\n", T);
    assert_exit(&o, 0);
    assert_eq!(stdout(&o), "piped\nend\n");

    // --tty: the pty master comes through our console socket.
    let sock = ConsoleSocket::bind(&env.dir.path().join("console.sock"));
    let mut c = env.husk();
    c.arg("exec")
        .arg("--tty")
        .arg("--console-socket")
        .arg(&sock.path)
        .args([
            "x",
            "sh",
            "-c",
            "test -t 0 && test -t 1 && echo is-a-tty; echo tty=$(tty); exit 3",
        ]);
    let exec = std::thread::spawn(move || run_timeout(c, T));
    let pty = sock.receive(T);
    assert!(pty.name.starts_with("/dev/pts/"), "pty name {:?}", pty.name);
    let text = read_pty(pty.master, T);
    let o = exec.join().unwrap();
    assert_exit(&o, 3);
    assert!(
        text.starts_with("is-a-tty\r\n"),
        "through a pty, lines end in \\r\\n: {text:?}"
    );
    // In the guest, the exec's terminal is one of the container's devpts.
    assert!(tty_line(&text).is_some_and(is_pts_name), "{text:?}");

    // --detach --pid-file: the pid stands for the process until it ends,
    // and exits with its status.
    // Its stdio stays with that pid (as runc's), so it goes to files.
    let pid_file = env.dir.path().join("exec.pid");
    let o = husk_leaving_monitor(
        &env,
        "detached-exec",
        &[
            "exec".as_ref(),
            "--detach".as_ref(),
            "--pid-file".as_ref(),
            pid_file.as_os_str(),
            "x".as_ref(),
            "sh".as_ref(),
            "-c".as_ref(),
            "echo detached-out; while [ ! -e /tmp/go ]; do sleep 0.05; done; exit 4".as_ref(),
        ],
    );
    assert_exit(&o, 0);
    let pid = read_pid(&pid_file);
    assert!(
        alive(pid),
        "the detached exec's pid runs while the process does"
    );
    let o = husk(&env, &["ps", "x"]);
    assert_exit(&o, 0);
    assert!(stdout(&o).starts_with("     PID"), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("/tmp/go"),
        "ps shows the exec: {}",
        stdout(&o)
    );
    // runc's json form (host pids, for the runc shim and `docker top`)
    // cannot be given: one clear error that says where to look instead.
    let o = husk(&env, &["ps", "--format", "json", "x"]);
    assert_one_line_error(&o, "run in its VM");
    assert_exit(&husk(&env, &["exec", "x", "touch", "/tmp/go"]), 0);
    assert_eq!(wait_exit_status(pid, T), Some(4));
    assert_eq!(container_output(&env, "detached-exec"), "detached-out\n");

    // events --stats: one runc stats event.
    let o = husk(&env, &["events", "--stats", "x"]);
    assert_exit(&o, 0);
    let ev: Value = serde_json::from_slice(&o.stdout).expect("events prints JSON");
    assert_eq!(ev["type"], "stats");
    assert!(ev["data"]["memory"]["usage"]["usage"].as_u64().unwrap() > 0);

    // pause freezes the VM; exec is refused meanwhile; resume.
    assert_exit(&husk(&env, &["pause", "x"]), 0);
    assert_eq!(status(&env, "x"), "paused");
    assert_one_line_error(&husk(&env, &["exec", "x", "true"]), "paused");
    assert_one_line_error(&husk(&env, &["pause", "x"]), "paused");
    assert_exit(&husk(&env, &["resume", "x"]), 0);
    assert_eq!(status(&env, "x"), "running");
    assert_exit(&husk(&env, &["exec", "x", "true"]), 0);

    assert_exit(&husk(&env, &["kill", "x", "KILL"]), 0);
    wait_status(&env, "x", "stopped");
    assert_exit(&husk(&env, &["delete", "x"]), 0);
    env.assert_no_leaks();
}

#[test]
fn vm_list_table_json_quiet() {
    let _leaks = LeakGuard::new();
    let env = Env::new("list");
    let b = term_42();
    assert_exit(&create(&env, &b, "list-b", None), 0);
    run_detached(&env, &b, "list-a");

    let o = husk(&env, &["list", "--quiet"]);
    assert_exit(&o, 0);
    assert_eq!(stdout(&o), "list-a\nlist-b\n");

    let o = husk(&env, &["list", "--format", "json"]);
    assert_exit(&o, 0);
    let v: Value = serde_json::from_slice(&o.stdout).expect("list json");
    let got: Vec<(String, String)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["id"].as_str().unwrap().to_string(),
                c["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("list-a".to_string(), "running".to_string()),
            ("list-b".to_string(), "created".to_string())
        ]
    );
    for c in v.as_array().unwrap() {
        assert!(c["pid"].as_i64().unwrap() > 0);
        assert_eq!(Path::new(c["bundle"].as_str().unwrap()), b.dir());
    }

    let o = husk(&env, &["list"]);
    assert_exit(&o, 0);
    let text = stdout(&o);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    for (h, col) in lines[0]
        .split_whitespace()
        .zip(["ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"])
    {
        assert_eq!(h, col, "{text}");
    }
    let row = |id: &str| -> Vec<String> {
        lines
            .iter()
            .find(|l| l.starts_with(id))
            .unwrap_or_else(|| panic!("no row for {id}: {text}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    assert_eq!(row("list-a")[2], "running");
    assert_eq!(row("list-b")[2], "created");
    assert_eq!(row("list-a")[3], b.dir().to_string_lossy());

    for id in ["list-a", "list-b"] {
        assert_exit(&husk(&env, &["delete", "--force", id]), 0);
    }
    let o = husk(&env, &["list", "--quiet"]);
    assert_eq!(stdout(&o), "");
    env.assert_no_leaks();
}

/// What the state root holds, to show that a failed verb changed nothing.
fn snapshot(env: &Env) -> Value {
    let o = husk(env, &["list", "--format", "json"]);
    assert_exit(&o, 0);
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn vm_errors_are_one_clear_line_and_change_nothing() {
    let _leaks = LeakGuard::new();
    let env = Env::new("errors");
    let b = term_42();
    let log = env.dir.path().join("husk-log.json");

    // Unknown id, for every verb that takes one; with --log and JSON
    // format the error is also appended as runc's JSON line (podman reads
    // it back).
    for args in [
        &["state", "nope"][..],
        &["start", "nope"],
        &["kill", "nope"],
        &["delete", "nope"],
        &["pause", "nope"],
        &["resume", "nope"],
        &["ps", "nope"],
        &["exec", "nope", "true"],
        &["events", "--stats", "nope"],
        &["update", "--memory", "64m", "nope"],
    ] {
        let mut c = env.husk();
        c.arg("--log")
            .arg(&log)
            .args(["--log-format", "json"])
            .args(args);
        let o = run_timeout(c, T);
        assert_one_line_error(&o, "container nope does not exist");
    }
    let lines: Vec<Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON log line"))
        .filter(|v: &Value| v["level"] == "error")
        .collect();
    assert_eq!(lines.len(), 10, "one JSON error line per failed verb");
    assert!(lines
        .iter()
        .all(|v| v["msg"] == "container nope does not exist"));

    // Invalid ids: refused before anything is made.
    for bad in ["bad/id", "..", "a b", ".hidden", "ünï"] {
        let o = husk(
            &env,
            &["create", "--bundle", b.dir().to_str().unwrap(), bad],
        );
        assert_one_line_error(&o, "invalid");
        assert_one_line_error(&husk(&env, &["state", bad]), "invalid");
    }
    assert_eq!(snapshot(&env), serde_json::json!([]));
    assert!(std::fs::read_dir(env.root()).unwrap().next().is_none());

    // An id in use.
    assert_exit(&create(&env, &b, "c", None), 0);
    let before = snapshot(&env);
    let o = create(&env, &b, "c", None);
    assert_one_line_error(&o, "already exists");
    assert_eq!(snapshot(&env), before);

    // start twice: the second is refused.
    assert_exit(&husk(&env, &["start", "c"]), 0);
    let before = snapshot(&env);
    assert_eq!(before[0]["status"], "running");
    assert_one_line_error(
        &husk(&env, &["start", "c"]),
        "cannot start container c: it is running",
    );
    assert_eq!(snapshot(&env), before);

    // delete without --force while it runs.
    assert_one_line_error(&husk(&env, &["delete", "c"]), "--force");
    assert_eq!(snapshot(&env), before);

    // Bad --process files.
    let bad_json = env.dir.path().join("bad.json");
    std::fs::write(&bad_json, "{\"args\": [\"true\"").unwrap();
    let no_args = env.dir.path().join("noargs.json");
    std::fs::write(
        &no_args,
        r#"{"cwd": "/", "user": {"uid": 0, "gid": 0}, "args": []}"#,
    )
    .unwrap();
    let missing = env.dir.path().join("missing.json");
    for (file, needle) in [
        (&bad_json, "invalid --process file"),
        (&no_args, "args is empty"),
        (&missing, "cannot read --process file"),
    ] {
        let o = husk(&env, &["exec", "--process", file.to_str().unwrap(), "c"]);
        assert_one_line_error(&o, needle);
    }
    let o = husk(&env, &["exec", "c"]);
    assert_one_line_error(&o, "needs a command");
    // Bad signals.
    assert_one_line_error(&husk(&env, &["kill", "c", "NOPE"]), "unknown signal");
    assert_one_line_error(&husk(&env, &["kill", "c", "99"]), "invalid signal");
    assert_eq!(snapshot(&env), before);
    // Only the init (and its sleep) runs: the failures started nothing.
    let o = husk(&env, &["ps", "c"]);
    assert_exit(&o, 0);
    let table = stdout(&o);
    for row in table.lines().skip(1) {
        assert!(
            row.contains("trap") || row.contains("sleep"),
            "unexpected process: {table}"
        );
    }

    assert_exit(&husk(&env, &["delete", "--force", "c"]), 0);
    // --force on what does not exist is fine (as runc).
    assert_exit(&husk(&env, &["delete", "--force", "c"]), 0);
    env.assert_no_leaks();
}

#[test]
fn vm_killed_monitor_is_stopped_and_delete_cleans_up() {
    let _leaks = LeakGuard::new();
    let env = Env::new("monkill");
    let b = term_42();
    run_detached(&env, &b, "m");
    let pid = state(&env, "m")["pid"].as_i64().unwrap() as i32;
    let dir = env.state_dir("m");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL).unwrap();
    wait_status(&env, "m", "stopped");
    assert_eq!(state(&env, "m")["pid"], 0);
    // QEMU and virtiofsd die with their monitor.
    let needle = dir.to_string_lossy().to_string();
    assert!(
        try_wait_until(EXIT_GRACE, || processes_mentioning(&needle).is_empty()).is_some(),
        "the VM outlived its monitor: {:?}",
        processes_mentioning(&needle)
    );
    assert!(
        dir.join("state.json").exists(),
        "the state stays until delete"
    );
    let o = husk(&env, &["list", "--format", "json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["status"], "stopped");
    assert_one_line_error(&husk(&env, &["exec", "m", "true"]), "stopped");
    assert_exit(&husk(&env, &["delete", "m"]), 0);
    assert!(!dir.exists(), "delete removed what was left");
    env.assert_no_leaks();
}

/// Holds the lock `husk` takes on a container's state dir.
fn hold_lock(dir: &Path) -> Flock<File> {
    Flock::lock(File::open(dir).unwrap(), FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("flock")
}

#[test]
fn vm_verbs_on_one_container_are_serialized_others_run_in_parallel() {
    let _leaks = LeakGuard::new();
    let env = Env::new("locks");
    let b = term_42();
    run_detached(&env, &b, "a");
    assert_exit(&create(&env, &b, "b", None), 0);

    // While a verb holds a's lock, a verb on a waits; verbs on b go on.
    let lock = hold_lock(&env.state_dir("a"));
    let mut c = env.husk();
    c.args(["state", "a"]);
    let waiting = std::thread::spawn(move || run_timeout(c, T));
    assert!(
        try_wait_until(Duration::from_secs(1), || waiting.is_finished()).is_none(),
        "`state a` ran while another verb held a's lock"
    );
    assert_eq!(status(&env, "b"), "created");
    assert_exit(&husk(&env, &["ps", "b"]), 0);
    assert!(!waiting.is_finished(), "`state a` went past the lock");
    drop(lock);
    let o = waiting.join().unwrap();
    assert_exit(&o, 0);
    assert!(stdout(&o).contains("\"running\""));

    // Two starts at once: one starts it, the other finds it running.
    let starts: Vec<_> = (0..2)
        .map(|_| {
            let mut c = env.husk();
            c.args(["start", "b"]);
            std::thread::spawn(move || run_timeout(c, T))
        })
        .collect();
    let outs: Vec<Output> = starts.into_iter().map(|t| t.join().unwrap()).collect();
    let ok = outs.iter().filter(|o| o.status.success()).count();
    assert_eq!(ok, 1, "exactly one start succeeds: {outs:?}");
    let failed = outs.iter().find(|o| !o.status.success()).unwrap();
    assert_one_line_error(failed, "it is running");
    assert_eq!(status(&env, "b"), "running");

    // Two creates of one id at once: one wins, the other is refused.
    let creates: Vec<_> = (0..2)
        .map(|i| {
            let mut c = env.husk();
            c.arg("create").arg("--bundle").arg(b.dir()).arg("dup");
            let prefix: PathBuf = env.dir.path().join(format!("dup-{i}"));
            std::thread::spawn(move || run_to_files(c, &prefix, T))
        })
        .collect();
    let outs: Vec<Output> = creates.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(
        outs.iter().filter(|o| o.status.success()).count(),
        1,
        "exactly one create succeeds: {outs:?}"
    );
    assert_one_line_error(
        outs.iter().find(|o| !o.status.success()).unwrap(),
        "already exists",
    );
    assert_eq!(status(&env, "dup"), "created");

    // Two forced deletes at once: both succeed, nothing is left.
    for id in ["a", "b", "dup"] {
        let dels: Vec<_> = (0..2)
            .map(|_| {
                let mut c = env.husk();
                c.args(["delete", "--force", id]);
                std::thread::spawn(move || run_timeout(c, T))
            })
            .collect();
        for d in dels {
            assert_exit(&d.join().unwrap(), 0);
        }
    }
    env.assert_no_leaks();
}

/// A poststop hook that appends the state it gets on stdin to `out`.
fn poststop_hook(out: &Path) -> Value {
    serde_json::json!({
        "path": "/bin/sh",
        "args": ["sh", "-c", format!("cat >> {}; echo >> {}", out.display(), out.display())],
    })
}

#[test]
fn vm_poststop_hooks_run_at_delete() {
    let _leaks = LeakGuard::new();
    let env = Env::new("poststop");
    let out = env.dir.path().join("poststop.calls");
    let calls = || std::fs::read_to_string(&out).unwrap_or_default();

    // A container that exits by itself: the hook waits for `delete`.
    let mut b = Bundle::busybox(&["true"]);
    b.spec["hooks"] = serde_json::json!({ "poststop": [poststop_hook(&out)] });
    b.save();
    assert_exit(&create(&env, &b, "done", None), 0);
    assert_exit(&husk(&env, &["start", "done"]), 0);
    wait_status(&env, "done", "stopped");
    assert_eq!(calls(), "", "poststop ran before delete");
    assert_exit(&husk(&env, &["delete", "done"]), 0);
    let state: Value = serde_json::from_str(calls().trim()).expect("the hook got the state");
    assert_eq!(state["id"], "done");
    assert_eq!(state["status"], "stopped");

    // A running container deleted with --force: the hook has run when
    // delete returns.
    std::fs::remove_file(&out).unwrap();
    let mut b = term_42();
    b.spec["hooks"] = serde_json::json!({ "poststop": [poststop_hook(&out)] });
    b.save();
    run_detached(&env, &b, "forced");
    assert_eq!(calls(), "");
    assert_exit(&husk(&env, &["delete", "--force", "forced"]), 0);
    let state: Value = serde_json::from_str(calls().trim()).expect("the hook got the state");
    assert_eq!(state["id"], "forced");
    env.assert_no_leaks();
}

/// The leak guard sees a real VM: a created container (its monitor, QEMU,
/// virtiofsd, its state dir) is reported as left until `delete` removes it.
#[test]
fn vm_the_leak_guard_reports_a_container_left_behind() {
    let leaks = LeakGuard::new();
    let env = Env::new("guard");
    let b = Bundle::busybox(&["sleep", "1000"]);
    assert_exit(&create(&env, &b, "g", None), 0);
    let left = leaks
        .check(Duration::from_secs(1))
        .expect_err("a created container is a leak until it is deleted");
    eprintln!("{left}");
    assert!(
        left.processes
            .iter()
            .any(|p| p.name.starts_with("qemu-system")),
        "QEMU is reported: {left}"
    );
    assert!(
        left.state.contains(&env.state_dir("g")),
        "the state dir is reported: {left}"
    );
    assert_exit(&husk(&env, &["delete", "--force", "g"]), 0);
    env.assert_no_leaks();
}

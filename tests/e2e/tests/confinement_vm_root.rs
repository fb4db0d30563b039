//! The VMM is confined against a hostile guest (issue #9, points 3, 5, 8
//! and the descriptors of 9), as root, booting real VMs: QEMU runs under
//! its seccomp sandbox as an unprivileged uid with no capability and
//! inherits no descriptor of husk's; virtiofsd is sandboxed; a guest that
//! floods its console cannot grow the host's console log past the cap; a
//! dead virtiofsd or QEMU stops the sandbox, and `delete -f` is quick.

use std::ffi::OsStr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use husk_e2e::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(120);
/// What issue #9 allows from a dead helper to a removed sandbox.
const DELETE_BOUND: Duration = Duration::from_secs(20);

fn husk(env: &Env, args: &[&str]) -> Output {
    let mut c = env.husk();
    c.args(args);
    run_timeout(c, T)
}

/// `husk run -d` whose monitor's stdio goes to `<envdir>/<id>.out/.err`.
fn run_detached(env: &Env, b: &Bundle, id: &str) {
    let mut c = env.husk();
    c.args([
        "run".as_ref(),
        "-d".as_ref(),
        "--bundle".as_ref(),
        b.dir().as_os_str(),
        OsStr::new(id),
    ]);
    assert_exit(&run_to_files(c, &env.dir.path().join(id), T), 0);
}

fn output_of(env: &Env, id: &str) -> String {
    std::fs::read_to_string(env.dir.path().join(format!("{id}.out"))).unwrap_or_default()
}

fn wait_output(env: &Env, id: &str, needle: &str) {
    let ok = try_wait_until(T, || output_of(env, id).contains(needle)).is_some();
    assert!(
        ok,
        "{needle:?} not in the output of {id}: {:?}",
        output_of(env, id)
    );
}

fn status(env: &Env, id: &str) -> String {
    let o = husk(env, &["state", id]);
    assert_exit(&o, 0);
    let v: Value = serde_json::from_slice(&o.stdout).expect("state prints JSON");
    v["status"].as_str().unwrap().to_string()
}

/// The sandbox's processes whose command line names `what`.
fn helper(env: &Env, id: &str, what: &str) -> Vec<u32> {
    let dir = env.state_dir(id).to_string_lossy().to_string();
    processes_mentioning(&dir)
        .into_iter()
        .filter(|(_, cmd)| cmd.contains(what))
        .map(|(p, _)| p)
        .collect()
}

fn qemu_of(env: &Env, id: &str) -> u32 {
    let q = helper(env, id, "qemu-system");
    assert_eq!(q.len(), 1, "one QEMU for {id}: {q:?}");
    q[0]
}

/// `Key:\tvalue` of /proc/PID/status.
fn status_line(pid: u32, key: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

fn fd_targets(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|p| p.to_string_lossy().to_string())
        .collect()
}

fn kill9(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn vm_qemu_is_seccomp_sandboxed_unprivileged_and_inherits_no_fd() {
    let _leaks = LeakGuard::new();
    // virtio-fs: QEMU unprivileged, virtiofsd beside it (a templated
    // sandbox shares over 9p: docs/templates.md).
    let env = Env::with("confine", Share::Virtiofs, |_| {});
    let b = Bundle::busybox(&["sh", "-c", "echo ready; sleep 1000"]);
    // A descriptor of the caller's (as --preserve-fds hands them over),
    // and a umask that would make everything world-writable.
    let marker = env.dir.path().join("preserved-marker");
    let f = std::fs::File::create(&marker).unwrap();
    let raw = f.as_raw_fd();
    let mut c = env.husk();
    c.args([
        "run".as_ref(),
        "-d".as_ref(),
        "--preserve-fds".as_ref(),
        "1".as_ref(),
        "--bundle".as_ref(),
        b.dir().as_os_str(),
        OsStr::new("c"),
    ]);
    // SAFETY: dup2 and umask are async-signal-safe; the descriptor stays
    // open in the parent for the spawn.
    unsafe {
        c.pre_exec(move || {
            if libc::dup2(raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::umask(0);
            Ok(())
        });
    }
    assert_exit(&run_to_files(c, &env.dir.path().join("c"), T), 0);
    drop(f);
    wait_output(&env, "c", "ready");

    let q = qemu_of(&env, "c");
    for key in [
        "Uid",
        "Gid",
        "Groups",
        "CapInh",
        "CapPrm",
        "CapEff",
        "CapBnd",
        "CapAmb",
        "NoNewPrivs",
        "Seccomp",
    ] {
        eprintln!("qemu {q} {key}: {}", status_line(q, key));
    }
    assert_eq!(status_line(q, "Seccomp"), "2");
    assert_eq!(status_line(q, "CapEff"), "0000000000000000");
    assert_eq!(status_line(q, "CapPrm"), "0000000000000000");
    assert_eq!(status_line(q, "NoNewPrivs"), "1");
    let uids: Vec<u32> = status_line(q, "Uid")
        .split_whitespace()
        .map(|u| u.parse().unwrap())
        .collect();
    assert!(
        uids.iter().all(|&u| u >= 2_000_000_000),
        "QEMU uids {uids:?}"
    );
    assert_eq!(status_line(q, "Groups"), "");
    let mut leaked = Vec::new();
    for p in helper(&env, "c", "virtiofsd").into_iter().chain([q]) {
        let t = fd_targets(p);
        eprintln!("pid {p} fds: {t:?}");
        if t.iter().any(|t| t.contains("preserved-marker")) {
            leaked.push(p);
        }
    }
    assert!(leaked.is_empty(), "the caller's fd reached {leaked:?}");
    for v in helper(&env, "c", "virtiofsd") {
        for key in ["Uid", "CapEff", "NoNewPrivs", "Seccomp"] {
            eprintln!("virtiofsd {v} {key}: {}", status_line(v, key));
        }
        let eff = u64::from_str_radix(&status_line(v, "CapEff"), 16).unwrap();
        assert_eq!(eff & (1 << 27), 0, "virtiofsd {v} holds CAP_MKNOD");
        assert_eq!(eff & (1 << 21), 0, "virtiofsd {v} holds CAP_SYS_ADMIN");
        assert_eq!(status_line(v, "NoNewPrivs"), "1");
    }
    // What husk made for QEMU is root's alone, whatever the umask.
    let d = env.state_dir("c");
    for s in ["qmp.sock", "agent.sock", "console.log"] {
        assert_eq!(mode(&d.join(s)), 0o600, "{s}");
    }
    // Two sandboxes never share a uid.
    run_detached(&env, &b, "d");
    wait_output(&env, "d", "ready");
    let q2 = qemu_of(&env, "d");
    assert_ne!(status_line(q, "Uid"), status_line(q2, "Uid"));
    for id in ["c", "d"] {
        assert_exit(&husk(&env, &["delete", "-f", id]), 0);
    }
    env.assert_no_leaks();
}

#[test]
fn vm_9p_keeps_qemu_root_but_seccomp_sandboxed() {
    let _leaks = LeakGuard::new();
    let env = Env::with("confine9p", Share::NineP, |_| {});
    let b = Bundle::busybox(&["sh", "-c", "echo ready; sleep 1000"]);
    run_detached(&env, &b, "n");
    wait_output(&env, "n", "ready");
    let q = qemu_of(&env, "n");
    eprintln!(
        "9p qemu {q}: Uid {} CapEff {} Seccomp {}",
        status_line(q, "Uid"),
        status_line(q, "CapEff"),
        status_line(q, "Seccomp")
    );
    assert_eq!(status_line(q, "Seccomp"), "2");
    assert!(status_line(q, "Uid").starts_with("0\t"));
    assert_exit(&husk(&env, &["delete", "-f", "n"]), 0);
    env.assert_no_leaks();
}

#[test]
fn vm_a_guest_flooding_its_console_stays_under_the_cap() {
    let _leaks = LeakGuard::new();
    const CAP: u64 = 65536;
    let env = Env::with("flood", Share::Auto, |doc| {
        doc["hypervisor"]["console_log_limit_bytes"] = toml_edit::value(CAP as i64);
    });
    // The container makes the guest's serial port and writes ~700 KB to it
    // (what a guest kernel owned by the workload could write at will).
    let b = Bundle::busybox(&[
        "sh",
        "-c",
        "mknod /dev/s c 4 64 && i=0; \
         while [ $i -lt 3000 ]; do \
           echo \"flood $i xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"; \
           i=$((i+1)); \
         done > /dev/s; echo END-OF-FLOOD > /dev/s; echo flooded; sleep 1000",
    ]);
    run_detached(&env, &b, "f");
    let log = env.state_dir("f").join("console.log");
    let mut biggest = 0;
    let t0 = Instant::now();
    let ok = try_wait_until(T, || {
        biggest = biggest.max(std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0));
        output_of(&env, "f").contains("flooded")
    })
    .is_some();
    assert!(ok, "the flood did not finish: {:?}", output_of(&env, "f"));
    let tail_ok = try_wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&log).is_ok_and(|s| s.contains("END-OF-FLOOD"))
    })
    .is_some();
    let len = std::fs::metadata(&log).unwrap().len();
    biggest = biggest.max(len);
    eprintln!(
        "flood of ~700 KB took {:?}; console.log {len} bytes now, at most {biggest} seen (cap {CAP})",
        t0.elapsed()
    );
    assert!(biggest <= CAP, "console.log reached {biggest} > {CAP}");
    assert!(tail_ok, "the tail of the flood is not in the log");
    assert!(len >= CAP / 4, "the log kept too little: {len}");
    assert_exit(&husk(&env, &["delete", "-f", "f"]), 0);
    env.assert_no_leaks();
}

#[test]
fn vm_a_killed_virtiofsd_stops_the_sandbox_and_delete_is_quick() {
    let _leaks = LeakGuard::new();
    // virtio-fs: QEMU unprivileged, virtiofsd beside it (a templated
    // sandbox shares over 9p: docs/templates.md).
    let env = Env::with("vfsdkill", Share::Virtiofs, |_| {});
    let b = Bundle::busybox(&["sh", "-c", "echo ready; sleep 1000"]);
    run_detached(&env, &b, "v");
    wait_output(&env, "v", "ready");
    assert_eq!(status(&env, "v"), "running");
    let helpers = helper(&env, "v", "virtiofsd");
    assert!(!helpers.is_empty(), "no virtiofsd for the sandbox");
    let t0 = Instant::now();
    for p in &helpers {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*p as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let stopped =
        try_wait_until(Duration::from_secs(10), || status(&env, "v") == "stopped").is_some();
    let noticed = t0.elapsed();
    eprintln!("virtiofsd killed: `husk state` says stopped after {noticed:?}");
    assert!(
        stopped,
        "still {} 10 s after virtiofsd died",
        status(&env, "v")
    );
    let t1 = Instant::now();
    let o = husk(&env, &["exec", "v", "true"]);
    eprintln!(
        "exec after virtiofsd died failed in {:?}: {}",
        t1.elapsed(),
        stderr(&o).trim()
    );
    assert_ne!(o.status.code(), Some(0));
    assert!(t1.elapsed() < Duration::from_secs(10));
    let t2 = Instant::now();
    assert_exit(&husk(&env, &["delete", "-f", "v"]), 0);
    eprintln!(
        "delete -f took {:?}; {:?} from the kill",
        t2.elapsed(),
        t0.elapsed()
    );
    assert!(t0.elapsed() < DELETE_BOUND, "{:?}", t0.elapsed());
    env.assert_no_leaks();
}

#[test]
fn vm_kill_then_delete_after_qemu_is_killed_is_quick() {
    let _leaks = LeakGuard::new();
    let env = Env::new("qemukill9");
    let b = Bundle::busybox(&["sh", "-c", "echo ready; sleep 1000"]);
    run_detached(&env, &b, "k");
    wait_output(&env, "k", "ready");
    let t0 = Instant::now();
    kill9(qemu_of(&env, "k"));
    // runc's sequence after a crash: kill -9 (may find it stopped), delete.
    let k = husk(&env, &["kill", "k", "9"]);
    eprintln!(
        "kill after QEMU died: exit {:?} {}",
        k.status.code(),
        stderr(&k).trim()
    );
    assert_exit(&husk(&env, &["delete", "-f", "k"]), 0);
    eprintln!(
        "QEMU killed: kill + delete -f done {:?} later",
        t0.elapsed()
    );
    assert!(t0.elapsed() < DELETE_BOUND, "{:?}", t0.elapsed());
    env.assert_no_leaks();
}

#[test]
fn vm_husk_check_and_a_guest_spec_still_boot_with_an_exec() {
    let _leaks = LeakGuard::new();
    // exec through the confined QEMU's agent socket still works end to end.
    let env = Env::new("confexec");
    let mut b = Bundle::busybox(&["sh", "-c", "echo ready; sleep 1000"]);
    b.spec["process"]["env"] = json!(["PATH=/bin"]);
    b.save();
    run_detached(&env, &b, "e");
    wait_output(&env, "e", "ready");
    let o = husk(&env, &["exec", "e", "echo", "hi-from-exec"]);
    assert_exit(&o, 0);
    assert_eq!(stdout(&o).trim(), "hi-from-exec");
    assert_exit(&husk(&env, &["pause", "e"]), 0);
    assert_exit(&husk(&env, &["resume", "e"]), 0);
    assert_exit(&husk(&env, &["delete", "-f", "e"]), 0);
    env.assert_no_leaks();
}

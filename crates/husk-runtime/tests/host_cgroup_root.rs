//! Host cgroups on the real host (needs root): `cargo test -p husk-runtime
//! --features root-tests --test host_cgroup_root`. Every test uses a path
//! of its own (`husk-test-<pid>-<n>`) and checks it left nothing behind.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use husk_runtime::host_cgroup::{HostCgroup, HostCgroupError, Limits};

/// One at a time: a test moves the whole test process between cgroups.
static SERIAL: Mutex<()> = Mutex::new(());

fn unique(tag: &str) -> String {
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("husk-test-{}-{n}-{tag}", std::process::id())
}

/// Every directory named `name` in any hierarchy under /sys/fs/cgroup.
fn leftovers(name: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for h in std::fs::read_dir("/sys/fs/cgroup").unwrap() {
        let out = Command::new("find")
            .arg(h.unwrap().path())
            .args(["-xdev", "-type", "d", "-name", name])
            .output()
            .unwrap();
        found.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(PathBuf::from),
        );
    }
    found
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn sleeper() -> Child {
    Command::new("sleep").arg("30").spawn().unwrap()
}

fn stop(mut c: Child) {
    let _ = c.kill();
    let _ = c.wait();
}

#[test]
fn absolute_path_with_limits_and_a_process() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let top = unique("abs");
    let path = format!("/{top}/sandbox");
    let limits = Limits::for_vm(64, 1, 32);
    let mut cg = HostCgroup::create(&path, "x", &limits).unwrap();
    assert!(!cg.is_v2(), "this test reads v1 files");
    let child = sleeper();
    let pid = child.id();
    cg.add(pid).unwrap();
    let mut seen = Vec::new();
    for dir in cg.paths() {
        assert!(dir.ends_with(format!("{top}/sandbox")), "{}", dir.display());
        let procs = read(&dir.join("cgroup.procs"));
        assert!(
            procs.lines().any(|l| l.trim() == pid.to_string()),
            "{pid} not in {}",
            dir.display()
        );
        if dir.join("memory.limit_in_bytes").exists() {
            let v = read(&dir.join("memory.limit_in_bytes"));
            eprintln!("{}/memory.limit_in_bytes = {}", dir.display(), v.trim());
            assert_eq!(v.trim().parse::<u64>().unwrap(), 96 << 20);
            seen.push("memory");
        }
        if dir.join("cpu.cfs_quota_us").exists() {
            let q = read(&dir.join("cpu.cfs_quota_us"));
            let p = read(&dir.join("cpu.cfs_period_us"));
            eprintln!(
                "{}/cpu.cfs_quota_us = {}, cpu.cfs_period_us = {}",
                dir.display(),
                q.trim(),
                p.trim()
            );
            assert_eq!(q.trim(), "150000");
            assert_eq!(p.trim(), "100000");
            seen.push("cpu");
        }
    }
    assert_eq!(seen, ["memory", "cpu"]);
    let in_proc = read(Path::new(&format!("/proc/{pid}/cgroup")));
    eprintln!("/proc/{pid}/cgroup:\n{in_proc}");
    assert!(in_proc
        .lines()
        .any(|l| l.contains(":memory:") && l.ends_with(&path)));

    // Busy: an error naming the process, and the cgroup stays.
    match cg.remove() {
        Err(HostCgroupError::NotEmpty { pids, .. }) => assert_eq!(pids, [pid]),
        other => panic!("{other:?}"),
    }
    assert!(!leftovers(&top).is_empty());
    stop(child);
    cg.remove().unwrap();
    drop(cg);
    assert_eq!(leftovers(&top), Vec::<PathBuf>::new());
}

#[test]
fn systemd_form_maps_under_cgroupfs() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let id = unique("sd");
    let existed = Path::new("/sys/fs/cgroup/memory/machine.slice").exists();
    let cg = HostCgroup::create(
        &format!("machine.slice:husktest:{id}"),
        "x",
        &Limits::for_vm(64, 1, 0),
    )
    .unwrap();
    for dir in cg.paths() {
        assert!(
            dir.ends_with(format!("machine.slice/husktest-{id}.scope")),
            "{}",
            dir.display()
        );
    }
    drop(cg);
    assert_eq!(
        leftovers(&format!("husktest-{id}.scope")),
        Vec::<PathBuf>::new()
    );
    // machine.slice was made for this test, and removed, unless it was there already.
    assert_eq!(
        Path::new("/sys/fs/cgroup/memory/machine.slice").exists(),
        existed
    );
}

#[test]
fn pre_existing_parent_stays() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let top = unique("pre");
    let mem = Path::new("/sys/fs/cgroup/memory").join(&top);
    std::fs::create_dir(&mem).unwrap();
    let cg = HostCgroup::create(&format!("/{top}/sb"), "x", &Limits::for_vm(64, 1, 0)).unwrap();
    drop(cg);
    assert!(mem.is_dir(), "the pre-existing parent was removed");
    assert!(!mem.join("sb").exists());
    std::fs::remove_dir(&mem).unwrap();
    assert_eq!(leftovers(&top), Vec::<PathBuf>::new());
}

/// The monitor adds itself; removal moves it back. The path is relative,
/// so the cgroup is under this process's own one in every hierarchy.
#[test]
fn current_process_is_moved_back() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let name = unique("self");
    let before = read(Path::new("/proc/self/cgroup"));
    let mut cg = HostCgroup::create(&name, "x", &Limits::for_vm(512, 1, 0)).unwrap();
    cg.add(std::process::id()).unwrap();
    let inside = read(Path::new("/proc/self/cgroup"));
    assert!(
        inside
            .lines()
            .any(|l| l.contains(":memory:") && l.ends_with(&name)),
        "{inside}"
    );
    // A child started now is born in it.
    let child = sleeper();
    let cpid = child.id();
    let child_cg = read(Path::new(&format!("/proc/{cpid}/cgroup")));
    assert!(
        child_cg
            .lines()
            .any(|l| l.contains(":memory:") && l.ends_with(&name)),
        "{child_cg}"
    );
    stop(child);
    cg.remove().unwrap();
    assert_eq!(read(Path::new("/proc/self/cgroup")), before);
    assert_eq!(leftovers(&name), Vec::<PathBuf>::new());
}

#[test]
fn bad_path_is_refused_before_anything_is_made() {
    let e = HostCgroup::create("/a/../b", "x", &Limits::for_vm(64, 1, 0)).unwrap_err();
    assert!(e.to_string().contains(".."), "{e}");
}

/// A child that starts its work 0.3 s after it is spawned (time to add it).
fn late(script: &str) -> Child {
    Command::new("sh")
        .args(["-c", &format!("sleep 0.3; {script}")])
        .spawn()
        .unwrap()
}

fn dir_of<'a>(cg: &'a HostCgroup, file: &str) -> &'a Path {
    cg.paths()
        .into_iter()
        .find(|d| d.join(file).exists())
        .unwrap()
}

/// The memory limit holds: a process that wants more is killed by the
/// kernel, and the cgroup never used more than its limit.
#[test]
fn memory_limit_is_enforced() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let top = unique("oom");
    let mut cg = HostCgroup::create(&format!("/{top}"), "x", &Limits::for_vm(16, 1, 16)).unwrap();
    // tail keeps the last line in memory: 100 MB without a newline.
    let mut child = late("head -c 100000000 /dev/zero | tail -n 1 >/dev/null");
    cg.add(child.id()).unwrap();
    let status = child.wait().unwrap();
    let mem = dir_of(&cg, "memory.max_usage_in_bytes");
    let max = read(&mem.join("memory.max_usage_in_bytes"));
    let failcnt = read(&mem.join("memory.failcnt"));
    let oom = read(&mem.join("memory.oom_control"));
    eprintln!(
        "status {status}, max_usage_in_bytes {}, failcnt {}, oom_control {oom:?}",
        max.trim(),
        failcnt.trim()
    );
    assert!(!status.success());
    assert!(max.trim().parse::<u64>().unwrap() <= 32 << 20);
    assert!(failcnt.trim().parse::<u64>().unwrap() > 0);
    cg.remove().unwrap();
    assert_eq!(leftovers(&top), Vec::<PathBuf>::new());
}

/// The CPU quota holds: a busy loop for 1 s of wall time gets about the
/// quota's share of a CPU, and is throttled.
#[test]
fn cpu_quota_is_enforced() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let top = unique("cpu");
    let limits = Limits {
        cpu_quota_us: Some(10_000),
        ..Limits::for_vm(64, 1, 0)
    };
    let mut cg = HostCgroup::create(&format!("/{top}"), "x", &limits).unwrap();
    let mut child = late("timeout 1 sh -c 'while :; do :; done'");
    cg.add(child.id()).unwrap();
    child.wait().unwrap();
    let cpu = dir_of(&cg, "cpu.stat");
    let stat = read(&cpu.join("cpu.stat"));
    let acct = dir_of(&cg, "cpuacct.usage");
    let usage_ns: u64 = read(&acct.join("cpuacct.usage")).trim().parse().unwrap();
    eprintln!("cpuacct.usage {usage_ns} ns over ~1 s at a 10% quota; cpu.stat:\n{stat}");
    let throttled: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("nr_throttled "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(throttled > 0);
    assert!(usage_ns < 300_000_000, "{usage_ns} ns");
    cg.remove().unwrap();
    assert_eq!(leftovers(&top), Vec::<PathBuf>::new());
}

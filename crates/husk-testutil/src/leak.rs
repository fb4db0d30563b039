//! The leak guard: what a test starts, it must also end.
//!
//! Every root test creates a [`LeakGuard`] first. The guard snapshots the
//! host (processes, mounts, tap devices, the runtime's state roots); the
//! test's [`TempDir`](crate::TempDir)s, container ids and other unique names
//! are *needles* the guard watches ([`watch`]). When the guard is dropped it
//! fails the test, listing what is left, if after a bounded grace period
//! there is still:
//!
//! - a process that was not there at the start and names a needle (on its
//!   command line; for `qemu-system*`, `virtiofsd` and
//!   `containerd-shim-husk*` also in its working directory or open files);
//! - a new mount that contains "husk" and a needle, or lies below a
//!   directory the test owns ([`own`]);
//! - a new tap device (husk creates none today, so any is a leak);
//! - a new entry naming a needle below a state root (`/run/husk`,
//!   `/run/husk-shim`), or any entry below a state root the test owns.
//!
//! Only what names a needle counts, so a concurrent test (`--test-threads=2`,
//! or another checkout's tests on the same host) cannot make this one fail:
//! its needles are other unique paths and ids. A real leak of this test
//! names this test's needles: QEMU, virtiofsd and the monitor all name the
//! sandbox dir `<root>/<id>`, and the root is in the test's temp dir.
//!
//! The guard never panics while the test is already panicking: it prints
//! what is left instead. Either way, at drop it kills the leaked processes
//! once reported (they name this test's needles), so one failure does not
//! leave VMs running under the next tests.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

/// The runtime's state root when `--root` is not given
/// (`husk_runtime::sandbox_dir::DEFAULT_ROOT`; husk-runtime's tests check
/// they agree).
pub const HUSK_STATE_ROOT: &str = "/run/husk";
/// The shim's state root when `HUSK_SHIM_ROOT` is not set
/// (`husk-shim`'s `service::DEFAULT_ROOT`).
pub const SHIM_STATE_ROOT: &str = "/run/husk-shim";

/// Where the guard looks and what it looks for. [`LeakConfig::host`] is the
/// real host; tests of the guard itself point it at fakes.
#[derive(Clone, Debug)]
pub struct LeakConfig {
    /// procfs (`/proc`).
    pub proc_dir: PathBuf,
    /// The mount table (`/proc/self/mountinfo`).
    pub mountinfo: PathBuf,
    /// Network devices (`/sys/class/net`); a tap has a `tun_flags` file.
    pub net_dir: PathBuf,
    /// State roots shared with other tests (`/run/husk`, `/run/husk-shim`).
    pub state_roots: Vec<PathBuf>,
    /// Process names (prefixes of `comm`) inspected beyond their command
    /// line: working directory and open files.
    pub process_names: Vec<String>,
    /// A mount counts only if its mountinfo line contains this.
    pub mount_marker: String,
    /// How long leftovers may take to go away (QEMU's shutdown, a monitor's
    /// last cleanup) before they are leaks.
    pub grace: Duration,
}

impl LeakConfig {
    pub fn host() -> LeakConfig {
        LeakConfig {
            proc_dir: "/proc".into(),
            mountinfo: "/proc/self/mountinfo".into(),
            net_dir: "/sys/class/net".into(),
            state_roots: vec![HUSK_STATE_ROOT.into(), SHIM_STATE_ROOT.into()],
            process_names: ["qemu-system", "virtiofsd", "containerd-shim"]
                .map(String::from)
                .to_vec(),
            mount_marker: "husk".into(),
            grace: Duration::from_secs(5),
        }
    }
}

impl Default for LeakConfig {
    fn default() -> Self {
        LeakConfig::host()
    }
}

/// A process as the guard sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    pub name: String,
    pub cmdline: String,
}

/// What a test left behind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Leaks {
    pub test: String,
    pub processes: Vec<Process>,
    pub mounts: Vec<String>,
    pub taps: Vec<String>,
    pub state: Vec<PathBuf>,
}

impl Leaks {
    pub fn is_empty(&self) -> bool {
        self.processes.is_empty()
            && self.mounts.is_empty()
            && self.taps.is_empty()
            && self.state.is_empty()
    }
}

impl fmt::Display for Leaks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "test {} left resources behind:", self.test)?;
        for p in &self.processes {
            writeln!(f, "  process {} ({}): {}", p.pid, p.name, p.cmdline)?;
        }
        for m in &self.mounts {
            writeln!(f, "  mount: {m}")?;
        }
        for t in &self.taps {
            writeln!(f, "  tap device: {t}")?;
        }
        for s in &self.state {
            writeln!(f, "  state: {}", s.display())?;
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Scope {
    test: String,
    config: LeakConfig,
    needles: Vec<String>,
    owned: Vec<PathBuf>,
    before_procs: BTreeSet<(u32, u64)>,
    before_mounts: BTreeSet<String>,
    before_taps: BTreeSet<String>,
    before_state: BTreeSet<PathBuf>,
}

thread_local! {
    /// The guards alive on this thread (libtest runs each test on its own
    /// thread), innermost last.
    static CURRENT: RefCell<Vec<Weak<Mutex<Scope>>>> = const { RefCell::new(Vec::new()) };
}

/// Fails a test that leaves processes, mounts, tap devices or state
/// behind; see the [module docs](self). Create it first in the test, so it
/// is dropped last:
///
/// ```no_run
/// let _leaks = husk_testutil::LeakGuard::new();
/// let dir = husk_testutil::TempDir::new("x"); // watched by the guard
/// ```
pub struct LeakGuard {
    scope: LeakScope,
}

/// What a [`LeakGuard`] watches; its methods are reached through the guard
/// (or, for the test's innermost guard, the free functions of this module).
pub struct LeakScope {
    scope: Arc<Mutex<Scope>>,
}

impl std::ops::Deref for LeakGuard {
    type Target = LeakScope;
    fn deref(&self) -> &LeakScope {
        &self.scope
    }
}

impl LeakGuard {
    /// A guard on the real host, named after the running test (libtest
    /// names each test's thread after it).
    pub fn new() -> LeakGuard {
        LeakGuard::with_config(LeakConfig::host())
    }

    /// A guard on the real host named `test` (a suite with its own runner).
    pub fn named(test: &str) -> LeakGuard {
        let g = LeakGuard::new();
        g.lock().test = test.to_string();
        g
    }

    /// How long leftovers may take to go at drop (default: the config's).
    pub fn with_grace(self, grace: Duration) -> LeakGuard {
        self.lock().config.grace = grace;
        self
    }

    pub fn with_config(config: LeakConfig) -> LeakGuard {
        let test = std::thread::current()
            .name()
            .unwrap_or("<unnamed>")
            .to_string();
        let scope = Scope {
            before_procs: processes(&config.proc_dir)
                .into_iter()
                .map(|(id, _)| id)
                .collect(),
            before_mounts: mount_lines(&config.mountinfo).into_iter().collect(),
            before_taps: taps(&config.net_dir).into_iter().collect(),
            before_state: config.state_roots.iter().flat_map(|r| walk(r)).collect(),
            test,
            config,
            needles: Vec::new(),
            owned: Vec::new(),
        };
        let scope = Arc::new(Mutex::new(scope));
        CURRENT.with(|c| c.borrow_mut().push(Arc::downgrade(&scope)));
        LeakGuard {
            scope: LeakScope { scope },
        }
    }
}

impl LeakScope {
    fn lock(&self) -> MutexGuard<'_, Scope> {
        // A test that panicked half-way still gets its leak report.
        self.scope.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Watches `needle` (a unique path or id of this test).
    pub fn watch(&self, needle: impl Into<String>) {
        let needle = needle.into();
        assert!(
            needle.len() >= 6,
            "leak needle {needle:?} is too short to be unique to one test"
        );
        self.lock().needles.push(needle);
    }

    /// Marks `dir` as the test's own: any entry or mount below it is a leak.
    pub fn own(&self, dir: &Path) {
        self.lock().owned.push(dir.to_path_buf());
    }

    /// What is left right now.
    pub fn leaks(&self) -> Leaks {
        self.lock().leaks(&[])
    }

    /// Waits up to `grace` for leftovers to go; `Err` with what is left.
    pub fn check(&self, grace: Duration) -> Result<(), Leaks> {
        self.check_except(grace, &[])
    }

    /// [`check`](Self::check), not counting `pids` (a daemon the test
    /// still runs and stops itself later, e.g. its containerd).
    pub fn check_except(&self, grace: Duration, pids: &[u32]) -> Result<(), Leaks> {
        let deadline = Instant::now() + grace;
        loop {
            let leaks = self.lock().leaks(pids);
            if leaks.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(leaks);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Fails the test unless everything is gone within `grace`.
    #[track_caller]
    pub fn assert_clean(&self, grace: Duration) {
        if let Err(leaks) = self.check(grace) {
            panic!("{leaks}");
        }
    }
}

impl Default for LeakGuard {
    fn default() -> Self {
        LeakGuard::new()
    }
}

impl Drop for LeakGuard {
    fn drop(&mut self) {
        // (A guard moved to another thread and dropped there leaves a dead
        // entry on its first thread: skipped by `with_current`.)
        let me = Arc::downgrade(&self.scope.scope);
        CURRENT.with(|c| {
            c.borrow_mut()
                .retain(|s| !s.ptr_eq(&me) && s.strong_count() > 0)
        });
        if std::thread::panicking() {
            // The test already failed: say what it left, do not panic again
            // (a panic in a drop while unwinding aborts the whole run).
            let leaks = self.leaks();
            if !leaks.is_empty() {
                eprintln!("{leaks}");
                kill(&leaks.processes);
            }
            return;
        }
        let grace = self.lock().config.grace;
        if let Err(leaks) = self.check(grace) {
            // Fail this test, but do not let its VMs burn CPU under the
            // next ones: what it left names its needles, so is its own.
            kill(&leaks.processes);
            panic!("{leaks}");
        }
    }
}

/// SIGKILLs the leaked processes (after they were reported).
fn kill(processes: &[Process]) {
    for p in processes {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p.pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

fn with_current<T>(f: impl FnOnce(&LeakScope) -> T) -> Option<T> {
    let scope = CURRENT.with(|c| c.borrow().iter().rev().find_map(Weak::upgrade))?;
    Some(f(&LeakScope { scope }))
}

/// Watches `needle` with this test's innermost guard (no guard: nothing).
pub fn watch(needle: impl Into<String>) {
    let needle = needle.into();
    with_current(|g| g.watch(needle));
}

/// Marks `dir` as owned by this test's innermost guard.
pub fn own(dir: &Path) {
    with_current(|g| g.own(dir));
}

/// Fails unless this test has a guard: helpers that start VMs call it, so
/// no test can forget its guard.
#[track_caller]
pub fn require_guard() {
    assert!(
        with_current(|_| ()).is_some(),
        "create a husk_testutil::LeakGuard at the start of the test (before any VM)"
    );
}

/// The explicit check some tests make half-way (and the old
/// `assert_no_leaks`): fails unless the innermost guard of this test sees
/// nothing left within `grace`.
#[track_caller]
pub fn assert_clean(grace: Duration) {
    assert_clean_except(grace, &[]);
}

/// [`assert_clean`], not counting `pids` (daemons the test stops later).
#[track_caller]
pub fn assert_clean_except(grace: Duration, pids: &[u32]) {
    require_guard();
    let r = with_current(|g| g.check_except(grace, pids)).unwrap();
    if let Err(leaks) = r {
        panic!("{leaks}");
    }
}

impl Scope {
    fn names_needle(&self, s: &str) -> bool {
        self.needles.iter().any(|n| s.contains(n.as_str()))
    }

    fn under_owned(&self, s: &str) -> bool {
        self.owned.iter().any(|d| {
            let d = d.to_string_lossy();
            s.contains(&format!("{d}/")) || s.split(' ').any(|f| f == d)
        })
    }

    fn leaks(&self, except: &[u32]) -> Leaks {
        let c = &self.config;
        let me = std::process::id();
        let processes = processes(&c.proc_dir)
            .into_iter()
            .filter(|(id, p)| {
                id.0 != me && !except.contains(&id.0) && !self.before_procs.contains(id) && {
                    self.names_needle(&p.cmdline)
                        || (c
                            .process_names
                            .iter()
                            .any(|n| p.name.starts_with(n.as_str()))
                            && refs(&c.proc_dir, p.pid)
                                .iter()
                                .any(|r| self.names_needle(r)))
                }
            })
            .map(|(_, p)| p)
            .collect();
        let mounts = mount_lines(&c.mountinfo)
            .into_iter()
            .filter(|l| !self.before_mounts.contains(l))
            .filter(|l| {
                (l.contains(c.mount_marker.as_str()) && self.names_needle(l)) || self.under_owned(l)
            })
            .collect();
        let taps = taps(&c.net_dir)
            .into_iter()
            .filter(|t| !self.before_taps.contains(t))
            .collect();
        let mut state: Vec<PathBuf> = c
            .state_roots
            .iter()
            .flat_map(|r| walk(r))
            .filter(|p| !self.before_state.contains(p) && self.names_needle(&p.to_string_lossy()))
            .collect();
        state.extend(self.owned.iter().flat_map(|d| walk(d)));
        Leaks {
            test: self.test.clone(),
            processes,
            mounts,
            taps,
            state,
        }
    }
}

/// Live processes: ((pid, start time), process). Zombies are gone already.
fn processes(proc_dir: &Path) -> Vec<((u32, u64), Process)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(proc_dir).into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ... starttime (field 22); comm may hold
        // spaces and parentheses, so split at the last ')'.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let name = head.split_once('(').map(|x| x.1).unwrap_or("").to_string();
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if matches!(fields.first(), Some(&"Z" | &"X")) {
            continue;
        }
        let start = fields.get(19).and_then(|s| s.parse().ok()).unwrap_or(0);
        let cmdline = std::fs::read(e.path().join("cmdline"))
            .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
            .unwrap_or_default();
        out.push((
            (pid, start),
            Process {
                pid,
                name,
                cmdline: cmdline.trim_end().to_string(),
            },
        ));
    }
    out
}

/// What process `pid` refers to: its working directory and open files.
fn refs(proc_dir: &Path, pid: u32) -> Vec<String> {
    let base = proc_dir.join(pid.to_string());
    let mut out: Vec<String> = std::fs::read_link(base.join("cwd"))
        .into_iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    for e in std::fs::read_dir(base.join("fd"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(t) = std::fs::read_link(e.path()) {
            out.push(t.to_string_lossy().into_owned());
        }
    }
    out
}

fn mount_lines(mountinfo: &Path) -> Vec<String> {
    std::fs::read_to_string(mountinfo)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Tap devices: network devices with a `tun_flags` attribute.
fn taps(net_dir: &Path) -> Vec<String> {
    std::fs::read_dir(net_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("tun_flags").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Entries below `root`, two levels deep (a sandbox dir and the sockets
/// and files in it).
fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let p = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(
                std::fs::read_dir(&p)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path()),
            );
        }
        out.push(p);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TempDir;
    use std::process::{Command, Stdio};

    /// A config whose shared parts are fakes in `dir`.
    fn fake(dir: &Path) -> LeakConfig {
        for d in ["net", "run"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        std::fs::write(
            dir.join("mountinfo"),
            "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n",
        )
        .unwrap();
        LeakConfig {
            mountinfo: dir.join("mountinfo"),
            net_dir: dir.join("net"),
            state_roots: vec![dir.join("run")],
            grace: Duration::from_millis(300),
            ..LeakConfig::host()
        }
    }

    fn panic_message(f: impl FnOnce()) -> String {
        let e = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_err();
        e.downcast_ref::<String>()
            .cloned()
            .unwrap_or_else(|| e.downcast_ref::<&str>().unwrap().to_string())
    }

    #[test]
    fn nothing_left_passes() {
        let scratch = TempDir::new("leak-clean");
        let g = LeakGuard::with_config(fake(scratch.path()));
        let d = TempDir::new("leak-clean-watched");
        g.watch(d.path().to_string_lossy());
        drop(d);
        drop(g);
    }

    #[test]
    fn a_process_named_like_qemu_that_outlives_the_test_is_reported() {
        let scratch = TempDir::new("leak-proc");
        // A "QEMU" that names the test's dir on its command line, as QEMU
        // names the sandbox dir: coreutils sleep under a qemu-like name.
        let qemu = scratch.path().join("qemu-system-x86_64");
        std::os::unix::fs::symlink("/bin/sleep", &qemu).unwrap();
        let g = LeakGuard::with_config(fake(scratch.path()));
        g.watch(scratch.path().to_string_lossy());
        let mut child = Command::new(&qemu)
            .arg("30")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let msg = panic_message(|| drop(g));
        // Reported, then killed by the guard (a 30 s sleep otherwise).
        let status = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
        );
        assert!(msg.contains("left resources behind"), "{msg}");
        assert!(
            msg.contains(&format!("process {} (qemu-system-x86)", child.id())),
            "the leaked process is named: {msg}"
        );
    }

    #[test]
    fn a_process_that_exits_within_the_grace_period_is_not_a_leak() {
        let scratch = TempDir::new("leak-grace");
        let mut cfg = fake(scratch.path());
        cfg.grace = Duration::from_secs(5);
        let g = LeakGuard::with_config(cfg);
        g.watch(scratch.path().to_string_lossy());
        let marker = scratch.path().join("marker");
        let child = Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("sleep 0.5; : {}", marker.display()))
            .spawn()
            .unwrap();
        // Reap it from another thread, as a monitor's exit would be.
        let reaper = std::thread::spawn(move || {
            let mut child = child;
            child.wait().unwrap()
        });
        drop(g);
        reaper.join().unwrap();
    }

    #[test]
    fn a_socket_left_in_a_state_root_is_reported() {
        let scratch = TempDir::new("leak-sock");
        let cfg = fake(scratch.path());
        let run = cfg.state_roots[0].clone();
        let g = LeakGuard::with_config(cfg);
        let id = format!("leaktest-{}", std::process::id());
        g.watch(&id);
        std::fs::create_dir(run.join(&id)).unwrap();
        let sock = run.join(&id).join("agent.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        // Another test's state in the same root is not this test's leak.
        std::fs::create_dir(run.join("someone-else-entirely")).unwrap();
        let msg = panic_message(|| drop(g));
        assert!(msg.contains(&sock.display().to_string()), "{msg}");
        assert!(!msg.contains("someone-else"), "{msg}");
    }

    #[test]
    fn a_mount_and_a_tap_left_behind_are_reported() {
        let scratch = TempDir::new("leak-mount");
        let cfg = fake(scratch.path());
        let g = LeakGuard::with_config(cfg.clone());
        let dir = scratch.path().join("husk-sandbox-xyz");
        g.watch(dir.to_string_lossy());
        let line = format!(
            "99 1 0:55 / {}/rootfs rw,relatime - virtiofs husk rw",
            dir.display()
        );
        let other = "98 1 0:54 / /tmp/husk-other-test/rootfs rw - tmpfs tmpfs rw";
        let mut table = std::fs::read_to_string(&cfg.mountinfo).unwrap();
        table.push_str(&format!("{line}\n{other}\n"));
        std::fs::write(&cfg.mountinfo, table).unwrap();
        std::fs::create_dir(cfg.net_dir.join("tap0")).unwrap();
        std::fs::write(cfg.net_dir.join("tap0/tun_flags"), "0x1002\n").unwrap();
        let msg = panic_message(|| drop(g));
        assert!(msg.contains(&line), "{msg}");
        assert!(!msg.contains("husk-other-test"), "{msg}");
        assert!(msg.contains("tap device: tap0"), "{msg}");
    }

    #[test]
    fn entries_below_an_owned_root_are_leaks() {
        let scratch = TempDir::new("leak-owned");
        let g = LeakGuard::with_config(fake(scratch.path()));
        let root = scratch.path().join("state");
        std::fs::create_dir_all(root.join("c1")).unwrap();
        g.own(&root);
        let leaks = g.check(Duration::ZERO).unwrap_err();
        assert_eq!(leaks.state, vec![root.join("c1")]);
        std::fs::remove_dir(root.join("c1")).unwrap();
        g.assert_clean(Duration::ZERO);
    }

    #[test]
    fn no_second_panic_while_the_test_is_already_failing() {
        let scratch = TempDir::new("leak-unwind");
        let msg = panic_message(|| {
            let g = LeakGuard::with_config(fake(scratch.path()));
            g.own(scratch.path());
            panic!("the test's own failure");
        });
        // Had the guard panicked while unwinding, the process would have
        // aborted; the test's own message is what reaches the runner.
        assert_eq!(msg, "the test's own failure");
    }

    #[test]
    fn temp_dirs_are_watched_by_the_current_guard() {
        let scratch = TempDir::new("leak-current");
        let g = LeakGuard::with_config(fake(scratch.path()));
        let d = TempDir::new("leak-current-watched");
        let needles = g.lock().needles.clone();
        assert_eq!(needles, vec![d.path().to_string_lossy().into_owned()]);
        require_guard();
        drop(d);
        drop(g);
        let msg = panic_message(require_guard);
        assert!(msg.contains("create a husk_testutil::LeakGuard"), "{msg}");
    }
}

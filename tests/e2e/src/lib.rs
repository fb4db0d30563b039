//! Test utilities for husk's end-to-end tests (root, real QEMU under TCG):
//! locating the built binaries and guest, building busybox bundles, running
//! `husk`, and checking that nothing is left behind.
//!
//! Inputs (set by `make test-e2e`; the defaults fit a repo build):
//! - `HUSK_BIN`: the husk binary (default `<repo>/target/release/husk`).
//! - `HUSK_GUEST_DIR`: holds `vmlinux`, `vmlinux.release`, `initrd.img`
//!   (default `<repo>/target/guest`).
//!
//! A missing prerequisite fails the test with a message that says how to
//! get it; nothing is skipped.

pub mod bench;
pub mod containerd;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub mod console;
pub mod podman;

pub mod spec;
pub mod timing;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

pub fn husk_bin() -> PathBuf {
    let p = std::env::var_os("HUSK_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/release/husk"));
    assert!(
        p.is_file(),
        "husk binary {} not found: run `make build` or set HUSK_BIN",
        p.display()
    );
    p
}

pub fn guest_dir() -> PathBuf {
    let d = std::env::var_os("HUSK_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/guest"));
    for f in ["vmlinux", "vmlinux.release", "initrd.img"] {
        assert!(
            d.join(f).is_file(),
            "{} not found: run `make guest` or set HUSK_GUEST_DIR",
            d.join(f).display()
        );
    }
    d
}

/// The guest kernel's release, as built.
pub fn guest_release() -> String {
    std::fs::read_to_string(guest_dir().join("vmlinux.release"))
        .unwrap()
        .trim()
        .to_string()
}

pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "end-to-end tests need root (they boot VMs and mount): run them as root"
    );
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique scratch directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("husk-e2e-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // Never cross into a mount that a failed test may have left.
        if !mounts_under(&self.0).is_empty() {
            eprintln!(
                "not removing {}: something is still mounted below it",
                self.0.display()
            );
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Mount points (in this mount namespace) at or below `dir`.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let d = dir.to_string_lossy().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|m| m == &d || m.starts_with(&format!("{d}/")))
        .collect()
}

/// Pids of processes whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let me = std::process::id();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmd.contains(needle) {
            out.push((pid, cmd));
        }
    }
    out
}

/// A state root for one test (`husk --root`), checked for leaks on demand.
pub struct Env {
    pub dir: TempDir,
    pub config: PathBuf,
}

impl Drop for Env {
    /// A test that failed half-way may leave its containers running (their
    /// monitors, QEMU, virtiofsd all name this directory): kill them, so
    /// that one failure does not leave VMs burning CPU under the next tests.
    /// A passing test has checked that nothing is left (`assert_no_leaks`).
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let needle = self.dir.path().to_string_lossy().to_string();
        for (pid, cmd) in processes_mentioning(&needle) {
            eprintln!("killing what the failed test left: {pid} {cmd}");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        wait_until(Duration::from_secs(10), || {
            processes_mentioning(&needle).is_empty()
        });
    }
}

/// Which shared filesystem a test forces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Share {
    Auto,
    Virtiofs,
    NineP,
}

impl Env {
    pub fn new(tag: &str) -> Env {
        Env::with(tag, Share::Auto, |_| {})
    }

    /// An environment whose config the caller may edit (a TOML table).
    pub fn with(tag: &str, share: Share, edit: impl FnOnce(&mut toml_edit::Table)) -> Env {
        require_root();
        let dir = TempDir::new(tag);
        let g = guest_dir();
        let mut hv = toml_edit::Table::new();
        hv.insert(
            "kernel",
            toml_edit::value(g.join("vmlinux").to_string_lossy().to_string()),
        );
        hv.insert(
            "initrd",
            toml_edit::value(g.join("initrd.img").to_string_lossy().to_string()),
        );
        let mut sfs = toml_edit::Table::new();
        sfs.insert(
            "kind",
            toml_edit::value(match share {
                Share::Auto => "auto",
                Share::Virtiofs => "virtiofs",
                Share::NineP => "9p",
            }),
        );
        let mut doc = toml_edit::DocumentMut::new();
        doc.insert("hypervisor", toml_edit::Item::Table(hv));
        doc.insert("shared_fs", toml_edit::Item::Table(sfs));
        edit(doc.as_table_mut());
        let config = dir.path().join("config.toml");
        std::fs::write(&config, doc.to_string()).unwrap();
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        Env { dir, config }
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// `husk --root <root> --config <config> ARGS...`
    pub fn husk(&self) -> Command {
        let mut c = Command::new(husk_bin());
        c.arg("--root")
            .arg(self.root())
            .arg("--config")
            .arg(&self.config);
        c
    }

    /// Runs `husk run` on `bundle` with `stdin` piped in; waits at most 120 s.
    pub fn run(&self, bundle: &Bundle, id: &str, stdin: &[u8]) -> Output {
        let mut c = self.husk();
        c.arg("run").arg("--bundle").arg(bundle.dir()).arg(id);
        run_with_input(c, stdin, Duration::from_secs(120))
    }

    /// Fails the test if anything of this environment is left: processes
    /// naming its directory (QEMU, virtiofsd, husk), mounts under it, or
    /// entries in its state root.
    pub fn assert_no_leaks(&self) {
        let needle = self.dir.path().to_string_lossy().to_string();
        assert_nothing_left(&Leftovers {
            needles: vec![needle],
            mount_roots: vec![self.dir.path().to_path_buf()],
            ..Leftovers::default()
        });
        let left: Vec<_> = std::fs::read_dir(self.root())
            .map(|r| r.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "state left behind: {left:?}");
    }

    /// `<root>/<id>`: the state dir of container `id`.
    pub fn state_dir(&self, id: &str) -> PathBuf {
        self.root().join(id)
    }
}

/// husk's state root when no `--root` is given. podman's cleanup process
/// (conmon's exit command) runs the runtime without the `--runtime-flag`s,
/// so containers run by podman must live here.
pub const DEFAULT_STATE_ROOT: &str = "/run/husk";

/// What a test must not leave behind.
#[derive(Debug, Default, Clone)]
pub struct Leftovers {
    /// No process may name any of these on its command line (a test's
    /// temp dir, a container id: QEMU, virtiofsd and the monitor all name
    /// the container's state dir), and no mount point may contain them.
    pub needles: Vec<String>,
    /// Nothing may be mounted at or below these.
    pub mount_roots: Vec<PathBuf>,
    /// These must not exist (state dirs).
    pub absent: Vec<PathBuf>,
}

/// How long processes may take to go after a test's last command (QEMU's
/// shutdown, podman's cleanup process started by conmon).
pub const EXIT_GRACE: Duration = Duration::from_secs(30);

/// Fails unless nothing of `what` is left: no process, no mount, no path.
pub fn assert_nothing_left(what: &Leftovers) {
    let procs = || -> Vec<(u32, String)> {
        what.needles
            .iter()
            .flat_map(|n| processes_mentioning(n))
            .collect()
    };
    let gone = wait_until(EXIT_GRACE, || procs().is_empty());
    assert!(gone, "processes left behind: {:?}", procs());
    let mut mounts: Vec<String> = what
        .mount_roots
        .iter()
        .flat_map(|d| mounts_under(d))
        .collect();
    mounts.extend(
        mount_points()
            .into_iter()
            .filter(|m| what.needles.iter().any(|n| m.contains(n.as_str()))),
    );
    assert!(mounts.is_empty(), "mounts left behind: {mounts:?}");
    let left: Vec<_> = what.absent.iter().filter(|p| p.exists()).collect();
    assert!(left.is_empty(), "state left behind: {left:?}");
}

/// Every mount point in this mount namespace.
pub fn mount_points() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .collect()
}

/// Runs `cmd` without input, capturing its output; kills it after `timeout`.
pub fn run_timeout(cmd: Command, timeout: Duration) -> Output {
    run_with_input(cmd, b"", timeout)
}

/// Makes this process the reaper of its orphaned descendants (as conmon
/// is), so a test can collect the exit status of a process that husk
/// leaves behind (a monitor, a detached exec).
pub fn become_subreaper() {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer argument and touches
    // no memory of ours.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(r, 0, "prctl(PR_SET_CHILD_SUBREAPER) failed");
}

/// Waits for `pid`, a child of this process (see [`become_subreaper`]),
/// to exit; returns its status as a shell shows it (code, or 128+signal),
/// or None if it did not exit within `timeout`.
pub fn wait_exit_status(pid: i32, timeout: Duration) -> Option<i32> {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let pid = nix::unistd::Pid::from_raw(pid);
    let mut status = None;
    wait_until(timeout, || {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => status = Some(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => status = Some(128 + sig as i32),
            Ok(_) => return false,
            Err(e) => panic!("waitpid({pid}): {e}: not a child of the test process"),
        }
        true
    });
    status
}

/// Whether `pid` is a live process (a zombie is not).
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rfind(')')
                .map(|i| !matches!(s[i + 1..].split_whitespace().next(), Some("Z" | "X")))
        })
        .unwrap_or(false)
}

/// Runs `cmd` with `input` on stdin and captures stdout/stderr, killing it
/// after `timeout`.
pub fn run_with_input(mut cmd: Command, input: &[u8], timeout: Duration) -> Output {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let program = cmd.get_program().to_owned();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program:?}: {e}"));
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let out = child.wait_with_output();
        let _ = tx.send(());
        out
    });
    if rx.recv_timeout(timeout).is_err() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        panic!("{program:?} did not finish within {timeout:?}");
    }
    let _ = writer.join();
    waiter.join().unwrap().expect("wait for husk")
}

/// Fills `rootfs` with a busybox-static root filesystem: `/bin/busybox`,
/// a symlink per applet, and the usual empty directories (as
/// `scripts/busybox-bundle.sh` does).
pub fn busybox_rootfs(rootfs: &Path) {
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc", "root", "home"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    let bb = Path::new("/bin/busybox");
    assert!(
        bb.is_file(),
        "/bin/busybox not found: install busybox-static (make setup)"
    );
    std::fs::copy(bb, rootfs.join("bin/busybox")).unwrap();
    let list = Command::new(bb).arg("--list").output().unwrap();
    for name in String::from_utf8_lossy(&list.stdout).lines() {
        if name != "busybox" {
            let _ = std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(name));
        }
    }
    std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\n").unwrap();
}

/// A busybox bundle in a temp dir.
pub struct Bundle {
    dir: TempDir,
    pub spec: Value,
}

impl Bundle {
    /// A busybox-static rootfs and a runc-like default spec running `args`.
    pub fn busybox(args: &[&str]) -> Bundle {
        let dir = TempDir::new("bundle");
        busybox_rootfs(&dir.path().join("rootfs"));
        let spec = json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": false,
                "user": {"uid": 0, "gid": 0},
                "args": args,
                "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
                "cwd": "/",
                "noNewPrivileges": true
            },
            "root": {"path": "rootfs", "readonly": false},
            "hostname": "husk",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
                {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
                {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
                {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
                {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}
            ],
            "linux": {
                "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]
            }
        });
        let b = Bundle { dir, spec };
        b.save();
        b
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }

    /// Writes `spec` to config.json (call after editing it).
    pub fn save(&self) {
        std::fs::write(
            self.dir.path().join("config.json"),
            serde_json::to_vec_pretty(&self.spec).unwrap(),
        )
        .unwrap();
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Asserts the exit code, showing the command's output otherwise.
pub fn assert_exit(o: &Output, code: i32) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "exited {:?}\nstdout: {}\nstderr: {}",
        o.status,
        stdout(o),
        stderr(o)
    );
}

/// Asserts that husk failed with one `husk: ...` line on stderr that
/// contains `needle`.
pub fn assert_one_line_error(o: &Output, needle: &str) {
    assert_ne!(o.status.code(), Some(0), "husk should fail");
    let err = stderr(o);
    let lines: Vec<_> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {err}");
    assert!(lines[0].starts_with("husk: "), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}

/// Runs `cmd` with stdin from /dev/null and stdout/stderr into
/// `<prefix>.out` / `<prefix>.err` (appending), for commands that leave a
/// process holding them (`husk create`, `husk run -d`: the monitor keeps
/// the container's stdio), so nobody waits for a pipe to close. Returns
/// the exit status and what the files hold once it has exited.
pub fn run_to_files(mut cmd: Command, prefix: &Path, timeout: Duration) -> Output {
    let path = |ext: &str| PathBuf::from(format!("{}.{ext}", prefix.display()));
    let open = |ext: &str| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path(ext))
            .unwrap()
    };
    let before = |ext: &str| std::fs::metadata(path(ext)).map(|m| m.len()).unwrap_or(0);
    let (out0, err0) = (before("out"), before("err"));
    cmd.stdin(Stdio::null())
        .stdout(open("out"))
        .stderr(open("err"));
    let program = cmd.get_program().to_owned();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program:?}: {e}"));
    let mut status = None;
    let done = wait_until(timeout, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    if !done {
        let _ = child.kill();
        panic!("{program:?} did not finish within {timeout:?}");
    }
    let read = |ext: &str, from: u64| {
        let all = std::fs::read(path(ext)).unwrap_or_default();
        all[(from as usize).min(all.len())..].to_vec()
    };
    Output {
        status: status.unwrap(),
        stdout: read("out", out0),
        stderr: read("err", err0),
    }
}

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
//!
//! The generic helpers (wait_until, TempDir, Bundle, LeakGuard) live in
//! `husk-testutil` and are re-exported here. Every test starts with
//! `let _leaks = LeakGuard::new();`: [`Env`] refuses to start without one.

pub mod bench;
pub mod containerd;
pub mod cri;
pub mod docker;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

pub use husk_testutil::leak::{self, LeakGuard};
pub use husk_testutil::{
    busybox_rootfs, default_spec, mount_points, mounts_under, try_wait_until, wait_until, Bundle,
    TempDir,
};

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

/// Runs `cmd` to its end; fails the test unless it succeeds.
#[track_caller]
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Writes a husk config at `path` that names the test guest (kernel and
/// initrd from [`guest_dir`]): what every front end's harness hands husk.
pub fn write_husk_config(path: &Path) {
    let g = guest_dir();
    std::fs::write(
        path,
        format!(
            "[hypervisor]\nkernel = {:?}\ninitrd = {:?}\n",
            g.join("vmlinux"),
            g.join("initrd.img")
        ),
    )
    .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// The guest kernel's release, as built.
pub fn guest_release() -> String {
    std::fs::read_to_string(guest_dir().join("vmlinux.release"))
        .unwrap()
        .trim()
        .to_string()
}

#[track_caller]
pub fn require_root() {
    husk_testutil::require_root("end-to-end tests (they boot VMs and mount)");
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

/// A state root for one test (`husk --root`), in a temp dir the test's
/// [`LeakGuard`] watches and whose state root it owns.
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
        try_wait_until(Duration::from_secs(10), || {
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
        leak::require_guard();
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
        leak::own(&dir.path().join("state"));
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

    /// Fails the test if anything of this environment is left (through
    /// the test's [`LeakGuard`]): processes naming its directory (QEMU,
    /// virtiofsd, husk), mounts naming it, entries in its state root.
    #[track_caller]
    pub fn assert_no_leaks(&self) {
        leak::assert_clean(EXIT_GRACE);
    }

    /// `<root>/<id>`: the state dir of container `id`.
    pub fn state_dir(&self, id: &str) -> PathBuf {
        self.root().join(id)
    }
}

/// husk's state root when no `--root` is given. podman's cleanup process
/// (conmon's exit command) runs the runtime without the `--runtime-flag`s,
/// so containers run by podman must live here.
pub const DEFAULT_STATE_ROOT: &str = leak::HUSK_STATE_ROOT;

/// How long processes may take to go after a test's last command (QEMU's
/// shutdown, podman's cleanup process started by conmon).
pub const EXIT_GRACE: Duration = Duration::from_secs(30);

/// Fails unless nothing the test's [`LeakGuard`] watches is left, after
/// also watching `needles` (container ids made by podman, whose state
/// lives in the shared `/run/husk`).
#[track_caller]
pub fn assert_nothing_left(needles: &[String]) {
    for n in needles {
        leak::watch(n.clone());
    }
    leak::assert_clean(EXIT_GRACE);
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
    try_wait_until(timeout, || match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::Exited(_, code)) => Some(code),
        Ok(WaitStatus::Signaled(_, sig, _)) => Some(128 + sig as i32),
        Ok(_) => None,
        Err(e) => panic!("waitpid({pid}): {e}: not a child of the test process"),
    })
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
    let done = try_wait_until(timeout, || child.try_wait().unwrap());
    let Some(status) = done else {
        let _ = child.kill();
        panic!("{program:?} did not finish within {timeout:?}");
    };
    let read = |ext: &str, from: u64| {
        let all = std::fs::read(path(ext)).unwrap_or_default();
        all[(from as usize).min(all.len())..].to_vec()
    };
    Output {
        status,
        stdout: read("out", out0),
        stderr: read("err", err0),
    }
}

//! podman driving husk (`podman --runtime <husk>`), as root, with no
//! registry and nothing shared with the host's own podman setup:
//!
//! - its own storage (`--root`, `--runroot`, `--tmpdir` under a temp dir),
//!   overlay driver, cgroupfs manager, file events backend, and a
//!   `containers.conf` of its own (`CONTAINERS_CONF`) that adds `husk` to
//!   the runtimes that write JSON errors (so podman passes `--log FILE
//!   --log-format json`) and sets `default_ulimits`: root here lacks
//!   `CAP_SYS_RESOURCE`, and rootful podman's default nofile/nproc limits
//!   exceed the hard limit, which runc (the baseline) cannot set;
//! - one busybox image, built from a busybox-static rootfs with `podman
//!   import` and reused by every test;
//! - husk's config (the guest kernel and initrd) reaches it as
//!   `--runtime-flag config=...`. Its state stays in the default root
//!   (`/run/husk`): podman's cleanup process (conmon's exit command) runs
//!   `delete` without the `--runtime-flag`s, so a `--root` given that way
//!   would leave every container's state behind.
//!
//! Every container a test makes gets a `--cidfile`, so the leak check knows
//! every id: no process, mount or state dir may name one afterwards.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::{
    assert_exit, assert_nothing_left, busybox_rootfs, husk_bin, require_root, run_timeout,
    run_with_input, stderr, TempDir, DEFAULT_STATE_ROOT,
};

/// The image every test runs.
pub const IMAGE: &str = "localhost/husk-e2e-busybox:latest";

/// How long one podman command may take (a VM boots in about 1.2 s under
/// TCG; the machine may be busy with other tests).
pub const PODMAN_TIMEOUT: Duration = Duration::from_secs(180);

/// Which OCI runtime podman drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    Husk,
    /// The baseline of the benchmarks.
    Runc,
}

/// A podman setup of its own: storage, configuration and the test image.
pub struct Podman {
    dir: TempDir,
    husk_config: PathBuf,
    ids: Mutex<Vec<String>>,
    counter: AtomicU32,
    /// podman runs inside this network namespace (its bridges, veths and
    /// port forwards live there), entered with `nsenter --net`.
    netns: Option<PathBuf>,
    /// Set by [`Podman::finish`]; otherwise dropping removes every
    /// container (a test that failed half-way leaves no VM running).
    finished: bool,
}

fn require_tool(name: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{name} not found: install the Debian package {package} (make setup)"
    );
}

const CONTAINERS_CONF: &str = r#"# containers.conf of husk's podman tests (CONTAINERS_CONF).
[containers]
# Root here lacks CAP_SYS_RESOURCE: podman's rootful defaults (above the
# hard limit) would make runc fail. husk applies rlimits in the guest.
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
# podman passes `--log FILE --log-format json` to these and reads the
# runtime's error back from FILE.
runtime_supports_json = ["crun", "runc", "kata", "runsc", "krun", "husk"]
"#;

impl Podman {
    /// Makes the storage and configuration, and imports the busybox image.
    pub fn new() -> Podman {
        Self::setup(None)
    }

    /// A setup whose podman runs inside the network namespace at `netns`
    /// (a test's own: `husk_testutil::netns::TestNetns`).
    pub fn in_netns(netns: &Path) -> Podman {
        Self::setup(Some(netns.to_path_buf()))
    }

    fn setup(netns: Option<PathBuf>) -> Podman {
        require_root();
        require_tool("podman", "podman");
        require_tool("conmon", "conmon");
        let dir = TempDir::new("podman");
        std::fs::write(dir.path().join("containers.conf"), CONTAINERS_CONF).unwrap();
        let husk_config = dir.path().join("husk.toml");
        crate::write_husk_config(&husk_config);
        let p = Podman {
            dir,
            husk_config,
            ids: Mutex::new(Vec::new()),
            counter: AtomicU32::new(0),
            netns,
            finished: false,
        };
        p.import_image();
        p
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn import_image(&self) {
        let rootfs = self.dir().join("image-rootfs");
        busybox_rootfs(&rootfs);
        let tar = self.dir().join("image.tar");
        let o = Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .output()
            .expect("run tar");
        assert_exit(&o, 0);
        let mut c = self.podman_bare();
        c.args(["import", "--quiet"]).arg(&tar).arg(IMAGE);
        let o = run_timeout(c, PODMAN_TIMEOUT);
        assert!(o.status.success(), "podman import failed: {}", stderr(&o));
        let _ = std::fs::remove_dir_all(&rootfs);
        let _ = std::fs::remove_file(&tar);
    }

    /// podman with this setup's storage and configuration, and no runtime
    /// chosen (podman's default).
    fn podman_bare(&self) -> Command {
        let d = self.dir();
        let mut c = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display()))
                    .arg("--")
                    .arg("podman");
                c
            }
            None => Command::new("podman"),
        };
        c.env("CONTAINERS_CONF", d.join("containers.conf"))
            .arg("--root")
            .arg(d.join("storage"))
            .arg("--runroot")
            .arg(d.join("runroot"))
            .arg("--tmpdir")
            .arg(d.join("tmp"))
            .args([
                "--storage-driver",
                "overlay",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "file",
            ]);
        c
    }

    /// podman driving `runtime`.
    pub fn podman_with(&self, runtime: Runtime) -> Command {
        let mut c = self.podman_bare();
        match runtime {
            Runtime::Husk => {
                c.arg("--runtime")
                    .arg(husk_bin())
                    .arg("--runtime-flag")
                    .arg(format!("config={}", self.husk_config.display()));
            }
            Runtime::Runc => {
                c.args(["--runtime", "runc"]);
            }
        }
        c
    }

    /// podman driving husk.
    pub fn podman(&self) -> Command {
        self.podman_with(Runtime::Husk)
    }

    /// `podman ARGS...` (husk), waited for at most [`PODMAN_TIMEOUT`].
    pub fn cmd(&self, args: &[&str]) -> Output {
        let mut c = self.podman();
        c.args(args);
        run_timeout(c, PODMAN_TIMEOUT)
    }

    /// A new `--cidfile` path; its id is recorded by [`Self::record`].
    pub fn cidfile(&self) -> PathBuf {
        let n = self.counter.fetch_add(1, Ordering::SeqCst);
        self.dir().join(format!("cid-{n}"))
    }

    /// Remembers the container id written to `cidfile`, if any; returns it.
    pub fn record(&self, cidfile: &Path) -> Option<String> {
        let id = std::fs::read_to_string(cidfile).ok()?.trim().to_string();
        if id.is_empty() {
            return None;
        }
        self.ids.lock().unwrap().push(id.clone());
        // Its state lives in the shared /run/husk: the test's guard
        // watches the id.
        crate::leak::watch(id.clone());
        Some(id)
    }

    /// `podman run --pull=never --network none --cidfile F ARGS...` with
    /// `stdin` piped in,
    /// using `runtime`; returns the output and the container id.
    pub fn run_with(
        &self,
        runtime: Runtime,
        args: &[&str],
        stdin: &[u8],
    ) -> (Output, Option<String>) {
        self.run_on("none", runtime, args, stdin)
    }

    /// `podman run --pull=never --network NETWORK --cidfile F ARGS...`.
    pub fn run_on(
        &self,
        network: &str,
        runtime: Runtime,
        args: &[&str],
        stdin: &[u8],
    ) -> (Output, Option<String>) {
        let cidfile = self.cidfile();
        let mut c = self.podman_with(runtime);
        c.args(["run", "--pull=never", "--network", network, "--cidfile"])
            .arg(&cidfile)
            .args(args);
        let o = run_with_input(c, stdin, PODMAN_TIMEOUT);
        let id = self.record(&cidfile);
        (o, id)
    }

    /// `podman run` (husk) without input; see [`Self::run_with`].
    pub fn run(&self, args: &[&str]) -> (Output, Option<String>) {
        self.run_with(Runtime::Husk, args, b"")
    }

    /// Every container id the tests made.
    pub fn ids(&self) -> Vec<String> {
        self.ids.lock().unwrap().clone()
    }

    /// The state dir husk keeps for container `id`.
    pub fn state_dir(id: &str) -> PathBuf {
        Path::new(DEFAULT_STATE_ROOT).join(id)
    }

    /// Fails unless container `id` left nothing: no process naming it (its
    /// monitor, QEMU, virtiofsd, conmon), no mount, no state dir.
    pub fn assert_container_gone(&self, id: &str) {
        assert_nothing_left(&[id.to_string()]);
        let dir = Self::state_dir(id);
        assert!(!dir.exists(), "state left behind: {}", dir.display());
    }

    /// Removes every container and image of this setup, then fails unless
    /// nothing of it is left: no process naming its directory or any of its
    /// containers, no mount below it, no state dir of any of its containers.
    pub fn finish(mut self) {
        self.finished = true;
        let rm = self.cmd(&["rm", "--all", "--force", "--time", "0"]);
        assert_exit(&rm, 0);
        let rmi = self.cmd(&["rmi", "--all", "--force"]);
        assert_exit(&rmi, 0);
        // Run on the suite's guard: it watches this setup's directory
        // (made under it) and now every container of every case.
        assert_nothing_left(&self.ids());
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.cmd(&["rm", "--all", "--force", "--time", "0"]);
        }
    }
}

impl Default for Podman {
    fn default() -> Self {
        Podman::new()
    }
}

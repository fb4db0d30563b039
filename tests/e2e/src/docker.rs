//! A private Docker daemon (Debian's `docker.io`, dockerd 20.10) driving
//! husk as `--runtime husk`, as root, with nothing shared with the host's
//! own Docker and no change to the host's network:
//!
//! - its own `--data-root`, `--exec-root`, socket (`-H unix://...`), pid
//!   file and `daemon.json` (which adds the `husk` runtime with
//!   `--config <husk.toml>` as its runtime argument, so the test guest is
//!   used); by default `--iptables=false --bridge=none` (no network but
//!   `--network none`), or, with [`Dockerd::start_with_bridge`], Docker's
//!   default bridge (`docker0`), its iptables rules and `docker-proxy`,
//!   all inside the daemon's own network namespace;
//! - the exec-root is exactly as long as Docker's default
//!   (`/var/run/docker`), so the runtime's `--root`
//!   (`<exec-root>/runtime-runc/moby`) and 64-character ids give husk's
//!   sockets the paths a default install gives them (beyond `sun_path`);
//! - it runs in a network namespace made for it (`ip netns add`, entered
//!   with `nsenter --net=...`), removed with it: every bridge, veth,
//!   iptables rule and published port is there, never in the host's
//!   namespace ([`Dockerd::netns_sh`] runs commands there);
//! - one busybox image, from a busybox-static rootfs with `docker import`;
//! - the client is Debian's `/usr/bin/docker` (20.10, API 1.41), with its
//!   own `DOCKER_CONFIG`.
//!
//! Dropping [`Dockerd`] stops the daemon (which stops its containers),
//! removes the namespace and every directory, on every path. Every
//! container id a test makes is recorded, and [`Dockerd::assert_clean`]
//! checks that nothing names one: no shim, monitor, QEMU or virtiofsd
//! process, no mount, no state below the runtime's root.

use std::cell::RefCell;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::{
    busybox_rootfs, husk_bin, leak, mounts_under, processes_mentioning, require_root,
    run_with_input, stderr, stdout, try_wait_until, EXIT_GRACE,
};

/// dockerd of Debian's `docker.io`.
pub const DOCKERD: &str = "/usr/sbin/dockerd";
/// Debian's client: it speaks dockerd 20.10's API (1.41).
pub const DOCKER: &str = "/usr/bin/docker";
/// The image every test runs.
pub const IMAGE: &str = "husk-e2e-busybox:latest";
/// The runtime's name in `daemon.json`.
pub const RUNTIME: &str = "husk";
/// How long one docker command may take (a VM boots in seconds under TCG;
/// the machine may be busy with other tests).
pub const DOCKER_TIMEOUT: Duration = Duration::from_secs(240);
/// Docker's default exec-root: the test's has the same length.
const DEFAULT_EXEC_ROOT: &str = "/var/run/docker";

static COUNTER: AtomicU32 = AtomicU32::new(0);
static DAEMONS: AtomicU32 = AtomicU32::new(0);

/// A private dockerd in a network namespace of its own.
pub struct Dockerd {
    /// Data root, socket, pid file, configs, logs (no "husk" in the path:
    /// Docker's own mounts below it are not husk's business).
    base: PathBuf,
    /// The exec-root, as long as `/var/run/docker`.
    exec_root: PathBuf,
    netns: String,
    /// Docker's bridge networking (default bridge, iptables) is on.
    bridge: bool,
    child: Option<Child>,
    ids: RefCell<Vec<String>>,
}

fn sh_any(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

impl Dockerd {
    /// Starts dockerd with no network but `none` (`--iptables=false
    /// --bridge=none`) and imports [`IMAGE`].
    pub fn start(tag: &str) -> Dockerd {
        Dockerd::start_with(tag, false)
    }

    /// Starts dockerd with its default bridge and iptables, in its own
    /// namespace, and imports [`IMAGE`].
    pub fn start_with_bridge(tag: &str) -> Dockerd {
        Dockerd::start_with(tag, true)
    }

    fn start_with(tag: &str, bridge: bool) -> Dockerd {
        require_root();
        leak::require_guard();
        for (bin, pkg) in [(DOCKERD, "docker.io"), (DOCKER, "docker.io")] {
            assert!(
                Path::new(bin).is_file(),
                "{bin} not found: install the Debian package {pkg} (make setup)"
            );
        }
        let n = DAEMONS.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let base = PathBuf::from(format!("/var/tmp/hkd-{tag}-{pid}-{n}"));
        // `/tmp/hkd` + 7 hex digits: as long as /var/run/docker (pids are
        // below 2^22, so this is unique for 16 daemons a process).
        let exec_root = PathBuf::from(format!(
            "/tmp/hkd{:07x}",
            (u64::from(pid) * 16 + u64::from(n % 16)) & 0xfff_ffff
        ));
        assert_eq!(
            exec_root.as_os_str().len(),
            DEFAULT_EXEC_ROOT.len(),
            "exec-root {}",
            exec_root.display()
        );
        let netns = format!("hkd-{pid}-{n}");
        let _ = std::fs::remove_dir_all(&base);
        let _ = std::fs::remove_dir_all(&exec_root);
        std::fs::create_dir_all(base.join("client")).unwrap();
        std::fs::create_dir_all(&exec_root).unwrap();
        let husk_config = base.join("husk.toml");
        crate::write_husk_config(&husk_config);
        let daemon_json = serde_json::json!({
            "runtimes": { RUNTIME: {
                "path": husk_bin(),
                "runtimeArgs": ["--config", husk_config],
            }},
        });
        std::fs::write(base.join("daemon.json"), daemon_json.to_string()).unwrap();
        let mut d = Dockerd {
            base,
            exec_root,
            netns,
            bridge,
            child: None,
            ids: RefCell::new(Vec::new()),
        };
        // From here on, Drop cleans up whatever fails.
        crate::run_ok(Command::new("ip").args(["netns", "add", &d.netns]));
        crate::run_ok(Command::new("ip").args(["-n", &d.netns, "link", "set", "lo", "up"]));
        let log = std::fs::File::create(d.base.join("dockerd.log")).unwrap();
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", d.netns))
            .arg(DOCKERD)
            .arg("--data-root")
            .arg(d.base.join("data"))
            .arg("--exec-root")
            .arg(&d.exec_root)
            .arg("-H")
            .arg(format!("unix://{}", d.socket().display()))
            .arg("--pidfile")
            .arg(d.base.join("dockerd.pid"))
            .arg("--config-file")
            .arg(d.base.join("daemon.json"))
            .args(if d.bridge {
                &[][..]
            } else {
                &["--iptables=false", "--ip6tables=false", "--bridge=none"][..]
            })
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        d.child = Some(cmd.spawn().expect("start dockerd"));
        let up = try_wait_until(Duration::from_secs(120), || {
            if let Some(Ok(Some(status))) = d.child.as_mut().map(|c| c.try_wait()) {
                panic!("dockerd exited at start ({status}): {}", d.log_tail());
            }
            let o = d.docker().arg("version").output().ok()?;
            o.status.success().then_some(())
        });
        assert!(up.is_some(), "dockerd did not answer: {}", d.log_tail());
        d.import_image();
        d
    }

    /// The daemon's network namespace (`/run/netns/<name>`).
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.netns)
    }

    /// `sh -c script` in the daemon's network namespace; its output,
    /// whatever the status.
    pub fn netns_sh(&self, script: &str) -> Output {
        sh_any(
            Command::new("nsenter")
                .arg(format!("--net={}", self.netns_path().display()))
                .args(["--", "sh", "-c", script]),
        )
    }

    fn socket(&self) -> PathBuf {
        self.base.join("docker.sock")
    }

    /// The runtime's `--root` as Docker passes it.
    pub fn runtime_root(&self) -> PathBuf {
        self.exec_root.join("runtime-runc/moby")
    }

    /// The last lines of dockerd's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.base.join("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// The client for this daemon.
    pub fn docker(&self) -> Command {
        let mut c = Command::new(DOCKER);
        c.env("DOCKER_CONFIG", self.base.join("client"))
            .arg("-H")
            .arg(format!("unix://{}", self.socket().display()));
        c
    }

    fn import_image(&self) {
        let rootfs = self.base.join("image-rootfs");
        busybox_rootfs(&rootfs);
        let tar = self.base.join("image.tar");
        crate::run_ok(
            Command::new("tar")
                .args(["--numeric-owner", "--owner=0", "--group=0", "-C"])
                .arg(&rootfs)
                .arg("-cf")
                .arg(&tar)
                .arg("."),
        );
        let o = self.cmd(&["import", &tar.to_string_lossy(), IMAGE]);
        assert!(o.status.success(), "docker import failed: {}", stderr(&o));
        let _ = std::fs::remove_dir_all(&rootfs);
        let _ = std::fs::remove_file(&tar);
    }

    /// `docker ARGS...`, waited for at most [`DOCKER_TIMEOUT`].
    pub fn cmd(&self, args: &[&str]) -> Output {
        self.cmd_with_input(args, b"")
    }

    /// `docker ARGS...` with `input` on stdin.
    pub fn cmd_with_input(&self, args: &[&str], input: &[u8]) -> Output {
        let mut c = self.docker();
        c.args(args);
        run_with_input(c, input, DOCKER_TIMEOUT)
    }

    /// `docker ARGS...`, which must succeed; its stdout, trimmed.
    #[track_caller]
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.cmd(args);
        assert!(
            o.status.success(),
            "docker {args:?} failed ({}): {}{}\ndockerd:\n{}",
            o.status,
            stdout(&o),
            stderr(&o),
            self.log_tail()
        );
        stdout(&o).trim().to_string()
    }

    /// `docker run --runtime husk --network none --cidfile F OPTS IMAGE CMD...`:
    /// the id is recorded whatever happens.
    pub fn run(&self, opts: &[&str], cmd: &[&str]) -> Output {
        self.run_on("none", opts, cmd)
    }

    /// [`Self::run`] on `network` (`bridge`, a network's name, `none`;
    /// `""`: no `--network`, Docker's default bridge).
    pub fn run_on(&self, network: &str, opts: &[&str], cmd: &[&str]) -> Output {
        let cid = self.cidfile();
        let mut args: Vec<String> = vec!["run".into(), "--runtime".into(), RUNTIME.into()];
        if !network.is_empty() {
            args.extend(["--network".into(), network.into()]);
        }
        args.extend(["--cidfile".into(), cid.to_string_lossy().into()]);
        args.extend(opts.iter().map(|s| s.to_string()));
        args.push(IMAGE.into());
        args.extend(cmd.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = self.cmd(&args);
        self.record(&cid);
        o
    }

    /// [`Self::run`] on a terminal: `script` gives the client a pty;
    /// `input` is typed once `delay` has passed. Returns the terminal's
    /// output and the client's exit code.
    pub fn run_on_terminal(
        &self,
        docker_args: &[&str],
        input: &[u8],
        delay: Duration,
    ) -> (String, Option<i32>) {
        let mut line = format!(
            "{DOCKER} -H unix://{} {}",
            self.socket().display(),
            docker_args.join(" ")
        );
        if docker_args.first() == Some(&"run") {
            let cid = self.cidfile();
            line = line.replacen(" run ", &format!(" run --cidfile {} ", cid.display()), 1);
            let r = on_terminal(&line, &self.base.join("client"), input, delay);
            self.record(&cid);
            return r;
        }
        on_terminal(&line, &self.base.join("client"), input, delay)
    }

    fn cidfile(&self) -> PathBuf {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        self.base.join(format!("cid-{n}"))
    }

    fn record(&self, cidfile: &Path) {
        if let Ok(id) = std::fs::read_to_string(cidfile) {
            let id = id.trim().to_string();
            if !id.is_empty() {
                self.remember(&id);
            }
        }
        let _ = std::fs::remove_file(cidfile);
    }

    /// Records a container id made another way (`run -d` prints it).
    pub fn remember(&self, id: &str) {
        leak::watch(id.to_string());
        self.ids.borrow_mut().push(id.to_string());
    }

    /// Every id recorded so far.
    pub fn ids(&self) -> Vec<String> {
        self.ids.borrow().clone()
    }

    /// The pids of dockerd and the containerd it started: the only
    /// processes of this setup that may outlive a container.
    fn daemon_pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = processes_mentioning(&self.exec_root.to_string_lossy())
            .into_iter()
            .filter(|(_, cmd)| cmd.starts_with("containerd ") || cmd.contains(DOCKERD))
            .map(|(p, _)| p)
            .collect();
        pids.extend(self.child.as_ref().map(Child::id));
        pids
    }

    /// Fails unless no process, mount or state names a container the test
    /// made (the daemon itself still runs), and the runtime's root holds
    /// no entry.
    #[track_caller]
    pub fn assert_clean(&self) {
        leak::own(&self.runtime_root());
        leak::assert_clean_except(EXIT_GRACE, &self.daemon_pids());
        let left: Vec<_> = std::fs::read_dir(self.runtime_root())
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(left.is_empty(), "left in the runtime root: {left:?}");
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pids = self.daemon_pids();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        // dockerd stops its containers first (10 s each before SIGKILL).
        let stopped = try_wait_until(Duration::from_secs(120), || {
            matches!(child.try_wait(), Ok(Some(_))).then_some(())
        });
        if stopped.is_none() {
            eprintln!("dockerd did not stop: killing it");
            let _ = child.kill();
            let _ = child.wait();
        }
        // Its containerd exits with it; never leave one.
        try_wait_until(Duration::from_secs(30), || {
            pids.iter().all(|p| !crate::alive(*p as i32)).then_some(())
        });
        for p in pids {
            if crate::alive(p as i32) {
                eprintln!("killing what dockerd left: {p}");
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        self.stop();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        for dir in [&self.exec_root, &self.base] {
            // Never cross into a mount that was left (a container's share).
            let left = mounts_under(dir);
            if !left.is_empty() {
                eprintln!("not removing {}: still mounted: {left:?}", dir.display());
                continue;
            }
            if let Err(e) = std::fs::remove_dir_all(dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    eprintln!("cannot remove {}: {e}", dir.display());
                }
            }
        }
    }
}

/// Runs the shell command `line` on a pty (`script -qec`), typing `input`
/// after `delay`; returns what the terminal showed and the exit code.
fn on_terminal(line: &str, client: &Path, input: &[u8], delay: Duration) -> (String, Option<i32>) {
    let mut child = Command::new("script")
        .args(["-qec", line, "/dev/null"])
        .env("DOCKER_CONFIG", client)
        .env("TERM", "xterm")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run script (bsdutils)");
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        std::thread::sleep(delay);
        let _ = stdin.write_all(&input);
        // Keep the terminal open until the command has ended: `script`
        // would end the session at end of input.
        std::thread::sleep(DOCKER_TIMEOUT);
    });
    drop(writer);
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(DOCKER_TIMEOUT) {
        Ok(Ok(o)) => (
            String::from_utf8_lossy(&o.stdout).to_string(),
            o.status.code(),
        ),
        _ => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("{line:?} did not finish within {DOCKER_TIMEOUT:?}");
        }
    }
}

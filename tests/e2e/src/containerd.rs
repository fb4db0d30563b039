//! A private containerd (Debian's 1.6) for the shim's end-to-end tests: its
//! own config, root, state, socket and shim state under a temp dir, the
//! husk shim on its `PATH`, a local busybox image, and a leak checker for
//! everything the shim makes.
//!
//! Inputs (the defaults fit a repo build):
//! - `HUSK_SHIM_BIN`: the shim (default `<repo>/target/release/containerd-shim-husk-v2`).
//! - `HUSK_GUEST_DIR`: as for the CLI tests.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use crate::{
    processes_mentioning, repo_root, require_root, run_with_input, try_wait_until, TempDir,
};

/// The runtime name under test.
pub const RUNTIME: &str = "io.containerd.husk.v2";
/// The local image every test imports.
pub const IMAGE: &str = "docker.io/library/husk-busybox:latest";
/// containerd's namespace for the tests.
pub const NAMESPACE: &str = "default";

pub fn shim_bin() -> PathBuf {
    let p = std::env::var_os("HUSK_SHIM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/release/containerd-shim-husk-v2"));
    assert!(
        p.is_file(),
        "shim binary {} not found: run `cargo build --release -p husk-shim` or set HUSK_SHIM_BIN",
        p.display()
    );
    p
}

fn sha256(path: &Path) -> String {
    let out = crate::run_ok(Command::new("sha256sum").arg(path));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Writes `data` as a blob of the OCI layout `dir`; returns (digest, size).
fn blob(dir: &Path, data: &[u8]) -> (String, usize) {
    let tmp = dir.join("blob.tmp");
    std::fs::write(&tmp, data).unwrap();
    let digest = sha256(&tmp);
    std::fs::rename(&tmp, dir.join("blobs/sha256").join(&digest)).unwrap();
    (format!("sha256:{digest}"), data.len())
}

/// An OCI image archive of a busybox-static rootfs (one uncompressed layer),
/// built once per test process into `target/e2e/` (replaced atomically, so
/// concurrent test processes may share it): `ctr images import` takes it as
/// [`IMAGE`].
pub fn busybox_image() -> PathBuf {
    static IMG: OnceLock<PathBuf> = OnceLock::new();
    IMG.get_or_init(|| {
        let d = TempDir::new("image");
        let rootfs = d.path().join("rootfs");
        for sub in ["bin", "proc", "sys", "dev", "tmp", "etc", "root", "run"] {
            std::fs::create_dir_all(rootfs.join(sub)).unwrap();
        }
        let bb = Path::new("/bin/busybox");
        assert!(
            bb.is_file(),
            "/bin/busybox not found: install busybox-static (make setup)"
        );
        std::fs::copy(bb, rootfs.join("bin/busybox")).unwrap();
        let list = crate::run_ok(Command::new(bb).arg("--list"));
        for name in String::from_utf8_lossy(&list.stdout).lines() {
            if name != "busybox" {
                let _ = std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(name));
            }
        }
        std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
        std::fs::write(rootfs.join("etc/group"), "root:x:0:\n").unwrap();
        let layout = d.path().join("layout");
        std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
        let layer = d.path().join("layer.tar");
        crate::run_ok(Command::new("tar")
            .args(["--numeric-owner", "--owner=0", "--group=0", "-C"])
            .arg(&rootfs)
            .arg("-cf")
            .arg(&layer)
            .arg("."));
        let (layer_digest, layer_size) = blob(&layout, &std::fs::read(&layer).unwrap());
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "Cmd": ["sh"],
                "WorkingDir": "/"
            },
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        });
        let (config_digest, config_size) = blob(&layout, config.to_string().as_bytes());
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer_size}],
        });
        let (manifest_digest, manifest_size) = blob(&layout, manifest.to_string().as_bytes());
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": manifest_size,
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {"io.containerd.image.name": IMAGE, "org.opencontainers.image.ref.name": "latest"},
            }],
        });
        std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
        std::fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        crate::run_ok(Command::new("tar")
            .arg("-C")
            .arg(&layout)
            .arg("-cf")
            .arg(d.path().join("image.tar"))
            .args(["oci-layout", "index.json", "blobs"]));
        let out = repo_root().join("target/e2e");
        std::fs::create_dir_all(&out).unwrap();
        let tmp = out.join(format!(".husk-busybox.tar.{}", std::process::id()));
        std::fs::copy(d.path().join("image.tar"), &tmp).unwrap();
        let tar = out.join("husk-busybox.tar");
        std::fs::rename(&tmp, &tar).unwrap();
        tar
    })
    .clone()
}

/// A private containerd with the husk shim on its `PATH`.
pub struct Containerd {
    pub dir: TempDir,
    child: Option<Child>,
    /// Shim sockets of the tasks the test ran, checked to be gone at the end.
    sockets: std::cell::RefCell<Vec<PathBuf>>,
}

impl Containerd {
    /// Starts containerd and imports [`IMAGE`].
    pub fn start(tag: &str) -> Containerd {
        require_root();
        crate::leak::require_guard();
        let shim = shim_bin();
        let dir = TempDir::new(&format!("ctrd-{tag}"));
        let d = dir.path();
        for sub in ["root", "state", "shim", "bin", "fifo", "opt"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        std::os::unix::fs::symlink(&shim, d.join("bin/containerd-shim-husk-v2")).unwrap();
        crate::write_husk_config(&d.join("husk.toml"));
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{d}/c.sock"
[debug]
  level = "info"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#,
            d = d.display()
        );
        std::fs::write(d.join("containerd.toml"), config).unwrap();
        let mut c = Containerd {
            dir,
            child: None,
            sockets: Default::default(),
        };
        c.launch();
        let img = busybox_image();
        let o = c
            .ctr()
            .args(["images", "import"])
            .arg(&img)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "ctr images import: {}",
            crate::stderr(&o)
        );
        c
    }

    fn launch(&mut self) {
        let d = self.dir.path().to_path_buf();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("containerd.log"))
            .unwrap();
        let path = format!(
            "{}:{}",
            d.join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let child = Command::new("containerd")
            .arg("--config")
            .arg(d.join("containerd.toml"))
            .env("PATH", path)
            .env("HUSK_CONFIG", d.join("husk.toml"))
            .env("HUSK_SHIM_ROOT", d.join("shim"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("containerd (apt-get install containerd)");
        self.child = Some(child);
        let up = try_wait_until(Duration::from_secs(60), || {
            self.ctr()
                .arg("version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        })
        .is_some();
        assert!(up, "containerd did not come up:\n{}", self.log_tail());
    }

    /// Stops containerd (the shims stay) and starts it again.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let pid = c.id();
            let gone = try_wait_until(Duration::from_secs(20), || {
                matches!(c.try_wait(), Ok(Some(_)))
            })
            .is_some();
            if !gone {
                let _ = c.kill();
                let _ = c.wait();
                eprintln!("containerd {pid} ignored SIGTERM; killed");
            }
        }
    }

    pub fn log_tail(&self) -> String {
        husk_log_tail(&self.dir.path().join("containerd.log"), 6000)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("c.sock")
    }

    /// `ctr --address <socket>`.
    pub fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(self.socket())
            .args(["-n", NAMESPACE]);
        c
    }

    /// `ctr ARGS...`, run to its end (at most 180 s).
    pub fn ctr_out(&self, args: &[&str]) -> Output {
        let mut c = self.ctr();
        c.args(args);
        self.output(c, b"")
    }

    /// `ctr run --runtime io.containerd.husk.v2 --fifo-dir ... ARGS` (ARGS
    /// carry the options, the image and the id).
    pub fn run_cmd(&self, args: &[&str]) -> Command {
        if let Some(i) = args.iter().position(|a| *a == IMAGE) {
            if let Some(id) = args.get(i + 1) {
                self.note_socket(id);
            }
        }
        let mut c = self.ctr();
        c.args(["run", "--runtime", RUNTIME, "--fifo-dir"])
            .arg(self.dir.path().join("fifo"))
            .args(args);
        c
    }

    /// Runs `cmd` with `input` on stdin; fails the test after 180 s.
    pub fn output(&self, cmd: Command, input: &[u8]) -> Output {
        run_with_input(cmd, input, Duration::from_secs(180))
    }

    /// `ctr run --rm IMAGE id ARGS...` with extra `opts`.
    pub fn run_rm(&self, opts: &[&str], id: &str, args: &[&str]) -> Output {
        let mut a = vec!["--rm"];
        a.extend_from_slice(opts);
        a.push(IMAGE);
        a.push(id);
        a.extend_from_slice(args);
        self.output(self.run_cmd(&a), b"")
    }

    /// `ctr run -d --null-io IMAGE id ARGS...` with extra `opts`; waits until
    /// the task runs.
    pub fn run_detached(&self, opts: &[&str], id: &str, args: &[&str]) {
        let mut a = vec!["-d", "--null-io"];
        a.extend_from_slice(opts);
        a.push(IMAGE);
        a.push(id);
        a.extend_from_slice(args);
        let o = self.output(self.run_cmd(&a), b"");
        crate::assert_exit(&o, 0);
        self.wait_status(id, "RUNNING");
        self.note_socket(id);
    }

    /// The task's status as `ctr task ls` shows it.
    pub fn task_status(&self, id: &str) -> Option<String> {
        let o = self.ctr().args(["task", "ls"]).output().ok()?;
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .skip(1)
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.first() == Some(&id)).then(|| f.last().unwrap_or(&"").to_string())
            })
    }

    pub fn wait_status(&self, id: &str, status: &str) {
        let ok = try_wait_until(Duration::from_secs(120), || {
            self.task_status(id).as_deref() == Some(status)
        })
        .is_some();
        assert!(
            ok,
            "task {id} did not become {status} (is {:?})\n{}",
            self.task_status(id),
            self.log_tail()
        );
    }

    /// The task's bundle (containerd's state dir for it).
    pub fn bundle(&self, id: &str) -> PathBuf {
        self.dir
            .path()
            .join("state/io.containerd.runtime.v2.task")
            .join(NAMESPACE)
            .join(id)
    }

    /// Remembers the shim socket of task `id`, to check it is gone later:
    /// the one in its bundle's `address`, and the one the shim derives.
    pub fn note_socket(&self, id: &str) {
        if let Ok(a) = std::fs::read_to_string(self.bundle(id).join("address")) {
            let p = PathBuf::from(a.trim().trim_start_matches("unix://"));
            self.sockets.borrow_mut().push(p);
        }
        let p = self.expected_socket(id);
        self.sockets.borrow_mut().push(p);
    }

    /// Where the shim of a pod named `id` listens:
    /// `/run/containerd/s/<sha256 of "<containerd address>/<namespace>/<id>">`.
    pub fn expected_socket(&self, id: &str) -> PathBuf {
        let key = format!("{}/{NAMESPACE}/{id}", self.socket().display());
        let mut h = Command::new("sha256sum")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("sha256sum");
        h.stdin.take().unwrap().write_all(key.as_bytes()).unwrap();
        let out = h.wait_with_output().unwrap();
        let hash = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        Path::new("/run/containerd/s").join(hash)
    }

    /// The shim's ttrpc socket for task `id`.
    pub fn shim_socket(&self, id: &str) -> PathBuf {
        let a = std::fs::read_to_string(self.bundle(id).join("address")).unwrap();
        PathBuf::from(a.trim().trim_start_matches("unix://"))
    }

    /// Pids of shim processes serving this containerd.
    pub fn shims(&self) -> Vec<u32> {
        let sock = self.socket().to_string_lossy().to_string();
        processes_mentioning(&sock)
            .into_iter()
            .filter(|(_, cmd)| cmd.contains("containerd-shim-husk-v2"))
            .map(|(p, _)| p)
            .collect()
    }

    /// QEMU processes of this containerd's pods.
    pub fn qemus(&self) -> Vec<u32> {
        let root = self.dir.path().join("shim").to_string_lossy().to_string();
        processes_mentioning(&root)
            .into_iter()
            .filter(|(_, cmd)| cmd.contains("qemu-system"))
            .map(|(p, _)| p)
            .collect()
    }

    /// Fails the test if anything of the shim's is left: shim, QEMU or
    /// virtiofsd processes, mounts under the temp dir, pod state dirs,
    /// task bundles, shim sockets.
    pub fn assert_no_leaks(&self) {
        // Shims, QEMU, virtiofsd, mounts: the test's guard (they all name
        // this setup's directory); containerd itself runs on.
        let me: Vec<u32> = self.child.iter().map(|c| c.id()).collect();
        crate::leak::assert_clean_except(Duration::from_secs(30), &me);
        // containerd cleans a dead shim's pod (`shim delete`) after it has
        // dropped the task: give it a moment.
        let shim_root = self.dir.path().join("shim");
        let _ = try_wait_until(Duration::from_secs(15), || {
            entries_per_namespace(&shim_root).is_empty()
        });
        let pods = entries_per_namespace(&shim_root);
        let listing: Vec<String> = pods
            .iter()
            .flat_map(|p| std::fs::read_dir(p).into_iter().flatten().flatten())
            .map(|e| e.path().display().to_string())
            .collect();
        assert!(
            pods.is_empty(),
            "pod state left behind: {pods:?}, holding {listing:?}\ncontainerd log:\n{}",
            self.log_tail()
        );
        let tasks = self.dir.path().join("state/io.containerd.runtime.v2.task");
        let bundles = entries_per_namespace(&tasks);
        assert!(bundles.is_empty(), "task bundles left behind: {bundles:?}");
        for s in self.sockets.borrow().iter() {
            let ok = try_wait_until(Duration::from_secs(10), || !s.exists()).is_some();
            assert!(ok, "shim socket left behind: {}", s.display());
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // A failed test may leave tasks: kill their shims (QEMU and
        // virtiofsd die with them) so nothing outlives the test.
        // containerd then runs `shim delete` for each, which removes the
        // rest (pod state, shim sockets).
        if std::thread::panicking() {
            for p in self.shims() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            try_wait_until(Duration::from_secs(20), || {
                self.ctr()
                    .args(["task", "ls", "-q"])
                    .output()
                    .map(|o| o.stdout.is_empty())
                    .unwrap_or(true)
            });
            eprintln!("containerd log:\n{}", self.log_tail());
        }
        self.stop();
    }
}

fn husk_log_tail(p: &Path, max: usize) -> String {
    let data = std::fs::read(p).unwrap_or_default();
    let start = data.len().saturating_sub(max);
    String::from_utf8_lossy(&data[start..]).to_string()
}

/// Runs `cmd` on a new pseudo-terminal (as a user at a terminal would: ctr
/// `--tty` insists on one) and returns what it printed and its exit code.
pub fn run_on_pty(mut cmd: Command, timeout: Duration) -> (String, Option<i32>) {
    let size = nix::pty::Winsize {
        ws_row: 24,
        ws_col: 80,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&size), None).expect("openpty");
    let slave = std::fs::File::from(pty.slave);
    cmd.stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave);
    // SAFETY: runs in the forked child before exec; setsid and the ioctl
    // are async-signal-safe and touch no shared state.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn on a pty");
    drop(cmd);
    let mut master = std::fs::File::from(pty.master);
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        // EIO once the last slave descriptor is closed.
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        out
    });
    let pid = child.id();
    let done = try_wait_until(timeout, || matches!(child.try_wait(), Ok(Some(_)))).is_some();
    if !done {
        let _ = child.kill();
        panic!("{pid} did not finish on its pty within {timeout:?}");
    }
    let code = child.wait().ok().and_then(|s| s.code());
    let out = reader.join().unwrap();
    (String::from_utf8_lossy(&out).to_string(), code)
}

/// A minimal ttrpc client for one call to the shim's task service, for
/// what `ctr` 1.6 cannot ask (it has no `task update`). `payload` is the
/// request message, protobuf-encoded; returns the response's payload or
/// its status message.
pub fn shim_call(socket: &Path, method: &str, payload: &[u8]) -> Result<Vec<u8>, String> {
    let mut req = Vec::new();
    pb_bytes(&mut req, 1, b"containerd.task.v2.Task");
    pb_bytes(&mut req, 2, method.as_bytes());
    pb_bytes(&mut req, 3, payload);
    let mut s = UnixStream::connect(socket).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    // Header: length, stream id (odd: client), type 1 (request), flags 0.
    let mut frame = Vec::new();
    frame.extend_from_slice(&(req.len() as u32).to_be_bytes());
    frame.extend_from_slice(&1u32.to_be_bytes());
    frame.extend_from_slice(&[1, 0]);
    frame.extend_from_slice(&req);
    s.write_all(&frame).map_err(|e| e.to_string())?;
    let mut header = [0u8; 10];
    s.read_exact(&mut header).map_err(|e| e.to_string())?;
    let len = u32::from_be_bytes(header[..4].try_into().unwrap()) as usize;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).map_err(|e| e.to_string())?;
    // Response: 1 status {1 code, 2 message}, 2 payload.
    let fields = pb_fields(&body);
    if let Some(status) = fields.iter().find(|(n, _)| *n == 1) {
        let st = pb_fields(&status.1);
        if let Some(msg) = st.iter().find(|(n, _)| *n == 2) {
            return Err(String::from_utf8_lossy(&msg.1).to_string());
        }
    }
    Ok(fields
        .into_iter()
        .find(|(n, _)| *n == 2)
        .map(|(_, v)| v)
        .unwrap_or_default())
}

fn pb_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Appends a varint field (integers, bools).
pub fn pb_uint(out: &mut Vec<u8>, field: u32, v: u64) {
    pb_varint(out, u64::from(field) << 3);
    pb_varint(out, v);
}

/// Appends a length-delimited field (strings, bytes, messages).
pub fn pb_bytes(out: &mut Vec<u8>, field: u32, data: &[u8]) {
    pb_varint(out, u64::from(field) << 3 | 2);
    pb_varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

/// The length-delimited fields of a message (others are skipped).
fn pb_fields(mut b: &[u8]) -> Vec<(u32, Vec<u8>)> {
    fn varint(b: &mut &[u8]) -> u64 {
        let mut v = 0u64;
        let mut shift = 0;
        while let Some((&x, rest)) = b.split_first() {
            *b = rest;
            v |= u64::from(x & 0x7f) << shift;
            shift += 7;
            if x < 0x80 {
                break;
            }
        }
        v
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = varint(&mut b);
        let (field, wire) = ((key >> 3) as u32, key & 7);
        match wire {
            0 => {
                varint(&mut b);
            }
            1 => b = &b[8.min(b.len())..],
            5 => b = &b[4.min(b.len())..],
            2 => {
                let n = (varint(&mut b) as usize).min(b.len());
                out.push((field, b[..n].to_vec()));
                b = &b[n..];
            }
            _ => break,
        }
    }
    out
}

/// `DIR/<namespace>/<entry>` for every namespace directory under `dir`.
fn entries_per_namespace(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|ns| std::fs::read_dir(ns.path()).into_iter().flatten().flatten())
        .map(|e| e.path())
        .collect()
}

//! Helpers for running the agent as a plain process: the started agent with
//! a ttrpc client, OCI specs, and the leak checks every test ends with. The
//! generic parts (temp dir, busybox rootfs, default spec, wait_until, the
//! leak guard) are `husk-testutil`'s.

#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use husk_testutil::{wait_until, LeakGuard, TempDir};

use husk_protocol::agent::{
    ContainerRequest, CreateContainerRequest, ExecProcessRequest, ProcessRequest,
    ReadStreamRequest, WaitProcessResponse,
};
use husk_protocol::agent_ttrpc::AgentClient;
use serde_json::{json, Value};

/// A private cgroup2 directory for one agent's containers, removed on drop:
/// under `/sys/fs/cgroup` when that is cgroup2 (as in the guest), else
/// under the cgroup2 mount of a hybrid host (`/sys/fs/cgroup/unified`,
/// which offers no controllers there, so limits cannot be tested).
pub struct CgroupDir(pub PathBuf);

impl CgroupDir {
    pub fn new(name: &str) -> Self {
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
        let mount = mounts
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
            })
            .min_by_key(|p| p.as_os_str().len())
            .expect("a cgroup2 mount (the tests need cgroup v2 somewhere)");
        let path = mount.join(format!("husk-test-{name}-{}", std::process::id()));
        let _ = fs::remove_dir(&path);
        Self(path)
    }

    /// Whether the kernel offers `controller` here.
    pub fn has_controller(&self, controller: &str) -> bool {
        let parent = self.0.parent().unwrap();
        fs::read_to_string(parent.join("cgroup.controllers"))
            .unwrap_or_default()
            .split_whitespace()
            .any(|c| c == controller)
    }
}

impl Drop for CgroupDir {
    fn drop(&mut self) {
        if let Ok(entries) = fs::read_dir(&self.0) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = fs::remove_dir(entry.path());
                }
            }
        }
        let _ = fs::remove_dir(&self.0);
    }
}

/// Per-call deadline, so a hung agent fails a test instead of hanging it.
pub fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_duration(Duration::from_secs(30))
}

/// Fails the test with a clear message unless it runs as root.
pub fn require_root() {
    husk_testutil::require_root("the agent-as-a-process tests (namespaces, mounts)");
}

/// Builds a busybox rootfs at `dir/rootfs`.
pub fn busybox_rootfs(dir: &Path) -> PathBuf {
    let rootfs = dir.join("rootfs");
    husk_testutil::busybox_rootfs(&rootfs);
    rootfs
}

/// A runc-like spec (the mounts and masks of `runc spec`) running `args`.
pub fn spec(rootfs: &Path, args: &[&str]) -> Value {
    let mut spec = husk_testutil::default_spec(args);
    spec["root"]["path"] = json!(rootfs);
    spec["process"]["capabilities"] =
        json!({"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"], "permitted": ["CAP_KILL"]});
    spec["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]);
    spec["mounts"].as_array_mut().unwrap().push(json!(
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}
    ));
    spec["linux"] = json!({
        "resources": {"devices": [{"allow": false, "access": "rwm"}]},
        "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"},
                       {"type": "uts"}, {"type": "mount"}],
        "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
        "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
    });
    spec
}

/// Direct children of `pid`.
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut children = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...; comm may contain spaces, so split after ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            children.push(child);
        }
    }
    children
}

/// The agent binary serving on a unix socket in a temp dir.
pub struct Agent {
    pub dir: TempDir,
    pub client: AgentClient,
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    /// Made before everything else of the agent's and dropped after it:
    /// fails the test if the agent, a container process naming the agent's
    /// dir, or a mount of it outlives the test.
    leaks: LeakGuard,
}

impl Agent {
    /// Starts the agent and connects to it.
    pub async fn start() -> Agent {
        Self::start_with(&[]).await
    }

    /// Starts the agent with its containers' cgroups under `cgroups`.
    pub async fn with_cgroups(cgroups: &CgroupDir) -> Agent {
        let root = cgroups.0.display().to_string();
        Self::start_with(&["--cgroup-root", &root]).await
    }

    /// Starts the agent with extra arguments and connects to it.
    pub async fn start_with(extra: &[&str]) -> Agent {
        require_root();
        let leaks = LeakGuard::new();
        let dir = TempDir::new("agent");
        let socket = dir.0.join("agent.sock");
        let log = dir.0.join("agent.log");
        // HUSK_AGENT_BIN runs the suite against another build (the static one).
        let binary = std::env::var_os("HUSK_AGENT_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_husk-agent")));
        let child = Command::new(binary)
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .args(extra)
            .env("HUSK_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting husk-agent");
        // The socket file appears at bind(), a moment before listen():
        // retry the connection until the agent accepts it.
        let address = format!("unix://{}", socket.display());
        let deadline = Instant::now() + Duration::from_secs(10);
        let client = loop {
            match ttrpc::r#async::Client::connect(&address).await {
                Ok(client) => break client,
                Err(e) => {
                    assert!(Instant::now() < deadline, "connecting to the agent: {e}");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        Agent {
            dir,
            client: AgentClient::new(client),
            child,
            socket,
            log,
            leaks,
        }
    }

    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A fresh busybox rootfs in its own directory.
    pub fn rootfs(&self, name: &str) -> PathBuf {
        let dir = self.dir.0.join(name);
        fs::create_dir_all(&dir).unwrap();
        busybox_rootfs(&dir)
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// CreateContainer with no storages.
    pub async fn create(&self, id: &str, spec: &Value) -> ttrpc::Result<()> {
        self.create_raw(id, spec.to_string().into_bytes()).await
    }

    /// CreateContainer with arbitrary spec bytes.
    pub async fn create_raw(&self, id: &str, spec: Vec<u8>) -> ttrpc::Result<()> {
        let request = CreateContainerRequest {
            container_id: id.to_string(),
            oci_spec_json: spec,
            ..Default::default()
        };
        self.client
            .create_container(ctx(), &request)
            .await
            .map(drop)
    }

    /// StartContainer.
    pub async fn start_container(&self, id: &str) -> ttrpc::Result<()> {
        let request = ContainerRequest {
            container_id: id.to_string(),
            ..Default::default()
        };
        self.client.start_container(ctx(), &request).await.map(drop)
    }

    /// Create and start.
    pub async fn run(&self, id: &str, spec: &Value) {
        self.create(id, spec).await.expect("CreateContainer");
        self.start_container(id).await.expect("StartContainer");
    }

    /// WaitProcess of the init.
    pub async fn wait(&self, id: &str) -> ttrpc::Result<WaitProcessResponse> {
        self.client.wait_process(ctx(), &process(id)).await
    }

    /// Reads stdout (or stderr) to end-of-file.
    pub async fn read_all(&self, id: &str, stderr: bool) -> Vec<u8> {
        self.read_all_of(id, "", stderr).await
    }

    /// ExecProcess of `process` (an OCI process object).
    pub async fn exec(&self, id: &str, exec_id: &str, process: &Value) -> ttrpc::Result<()> {
        let request = ExecProcessRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            process_json: process.to_string().into_bytes(),
            ..Default::default()
        };
        self.client.exec_process(ctx(), &request).await.map(drop)
    }

    /// WaitProcess of an exec.
    pub async fn wait_exec(&self, id: &str, exec_id: &str) -> ttrpc::Result<WaitProcessResponse> {
        let request = ProcessRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            ..Default::default()
        };
        self.client.wait_process(ctx(), &request).await
    }

    /// Runs an exec to completion: (stdout, stderr, status).
    pub async fn exec_to_end(
        &self,
        id: &str,
        exec_id: &str,
        process: &Value,
    ) -> (String, String, WaitProcessResponse) {
        self.exec(id, exec_id, process).await.expect("ExecProcess");
        let (out, err) = tokio::join!(
            self.read_all_of(id, exec_id, false),
            self.read_all_of(id, exec_id, true)
        );
        let status = self.wait_exec(id, exec_id).await.expect("WaitProcess");
        (
            String::from_utf8_lossy(&out).into_owned(),
            String::from_utf8_lossy(&err).into_owned(),
            status,
        )
    }

    /// RemoveContainer.
    pub async fn remove(&self, id: &str) -> ttrpc::Result<()> {
        let request = ContainerRequest {
            container_id: id.to_string(),
            ..Default::default()
        };
        self.client
            .remove_container(ctx(), &request)
            .await
            .map(drop)
    }

    /// Reads stdout (or stderr) of process `(id, exec_id)` to end-of-file.
    pub async fn read_all_of(&self, id: &str, exec_id: &str, stderr: bool) -> Vec<u8> {
        let mut all = Vec::new();
        loop {
            let request = ReadStreamRequest {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
                max_len: husk_protocol::MAX_CHUNK,
                ..Default::default()
            };
            let reply = if stderr {
                self.client.read_stderr(ctx(), &request).await
            } else {
                self.client.read_stdout(ctx(), &request).await
            }
            .expect("Read*");
            if reply.data.is_empty() {
                return all;
            }
            assert!(reply.data.len() <= husk_protocol::MAX_CHUNK as usize);
            all.extend(reply.data);
        }
    }

    /// Runs `spec` to completion: (stdout, stderr, status).
    pub async fn run_to_end(
        &self,
        id: &str,
        spec: &Value,
    ) -> (String, String, WaitProcessResponse) {
        self.run(id, spec).await;
        let (out, err) = tokio::join!(self.read_all(id, false), self.read_all(id, true));
        let status = self.wait(id).await.expect("WaitProcess");
        (
            String::from_utf8_lossy(&out).into_owned(),
            String::from_utf8_lossy(&err).into_owned(),
            status,
        )
    }

    /// Stops the agent with SIGTERM and checks it left nothing behind: it
    /// exits 0, its children are gone, and no mount remains under its dir.
    pub fn stop(mut self) {
        let children = children_of(self.pid());
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = self.child.wait().unwrap();
        assert!(
            status.success(),
            "the agent exited with {status}; log:\n{}",
            self.log()
        );
        self.check_no_leaks(&children);
    }

    /// Asserts that `children` are gone and, through the agent's leak
    /// guard, that no process or mount names the agent's dir.
    pub fn check_no_leaks(&self, children: &[u32]) {
        wait_until(
            Duration::from_secs(10),
            "the agent's children to exit",
            || {
                children
                    .iter()
                    .all(|pid| !Path::new(&format!("/proc/{pid}")).exists())
            },
        );
        self.leaks.assert_clean(Duration::from_secs(10));
        assert!(!self.socket.exists(), "the agent left its socket behind");
    }

    /// Waits for the agent to exit by itself (after Shutdown).
    pub fn wait_exit(mut self, children: &[u32]) {
        let status = self.child.wait().unwrap();
        assert!(
            status.success(),
            "the agent exited with {status}; log:\n{}",
            self.log()
        );
        self.check_no_leaks(children);
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("HUSK_TEST_SHOW_LOG").is_some() {
            eprintln!("---- agent log ----\n{}", self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An OCI process object running `args` as root, with the spec's PATH.
pub fn exec_process(args: &[&str]) -> Value {
    json!({
        "terminal": false,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "cwd": "/"
    })
}

/// The value of the `KEY=value` line of `out` (a terminal's output, so
/// lines may end in `\r`).
pub fn line_value<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines().find_map(|l| {
        l.trim_end_matches('\r')
            .strip_prefix(key)?
            .strip_prefix('=')
    })
}

/// Whether `name` is a terminal of the container's devpts: `/dev/pts/N`.
pub fn is_pts_name(name: &str) -> bool {
    name.strip_prefix("/dev/pts/")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// A request naming a container's init.
pub fn process(id: &str) -> ProcessRequest {
    ProcessRequest {
        container_id: id.to_string(),
        ..Default::default()
    }
}

/// The status code and message of a failed call.
pub fn status_of(error: ttrpc::Error) -> (ttrpc::Code, String) {
    match error {
        ttrpc::Error::RpcStatus(status) => (status.code(), status.message().to_string()),
        other => panic!("expected an error status, got {other:?}"),
    }
}

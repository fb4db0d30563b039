//! Kubernetes' view of husk: a private containerd 1.6 with its CRI plugin,
//! driven over its CRI socket the way kubelet drives it (the `k8s-cri`
//! crate's gRPC client), with the runtime handler `husk`
//! (`io.containerd.husk.v2`, husk's config named through the handler's
//! options), Debian's CNI plugins (bridge, host-local, loopback) and a local
//! pause image (busybox whose entrypoint sleeps; no registry).
//!
//! containerd runs in a network namespace the test makes (`ip netns add`,
//! entered with `nsenter --net=`) and removes: the CNI bridge, the pods'
//! veths and addresses exist only there. Pod network namespaces are kept
//! under containerd's state dir (`netns_mounts_under_state_dir`), not in
//! `/run/netns`; pods get a cgroup parent of the test's, checked empty and
//! removed at the end.
//!
//! Inputs: `HUSK_SHIM_BIN` and `HUSK_GUEST_DIR`, as for the `ctr` tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{self as cri};
use tonic::transport::{Channel, Endpoint};

use crate::containerd::{busybox_image, shim_bin, IMAGE};
use crate::{processes_mentioning, require_root, try_wait_until, wait_until, TempDir};

/// containerd's CRI namespace.
pub const NAMESPACE: &str = "k8s.io";
/// The runtime handler (RuntimeClass `handler`) under test.
pub const HANDLER: &str = "husk";
/// The local pause image.
pub const PAUSE_IMAGE: &str = "docker.io/library/husk-pause:latest";
/// The pods' subnet (exists only in the test's network namespace).
pub const SUBNET_PREFIX: &str = "10.244.77.";
const SUBNET: &str = "10.244.77.0/24";
const BRIDGE: &str = "huskcri0";

/// A private containerd with the CRI plugin, in a network namespace of its own.
pub struct Cri {
    pub dir: TempDir,
    /// `/run/netns/<netns>`: where containerd (and CNI) run.
    pub netns: String,
    /// The pods' cgroup parent (cgroupfs), e.g. `/husk-cri-123-0`.
    pub cgroup_parent: String,
    /// `HUSK_SHIM_ROOT`: the pods' state dirs.
    pub shim_root: PathBuf,
    /// The CNI network's name, this instance's own, so libcni's cache
    /// entries (`<network>-<container>-<ifname>`) of parallel tests differ.
    pub cni_network: String,
    child: Option<Child>,
    rt: tokio::runtime::Runtime,
    channel: Channel,
}

/// [`crate::run_ok`]'s stdout.
fn run(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&crate::run_ok(cmd).stdout).into_owned()
}

/// The pause image: [`busybox_image`] with an entrypoint that sleeps, as
/// an OCI archive next to it.
fn pause_image(dir: &Path) -> PathBuf {
    let layout = dir.join("pause");
    std::fs::create_dir_all(&layout).unwrap();
    run(Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-xf")
        .arg(busybox_image()));
    let blob_path = |digest: &str| {
        layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let read_json = |p: PathBuf| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(&p).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    };
    let write_blob = |v: &serde_json::Value| -> (String, usize) {
        let data = v.to_string();
        let tmp = layout.join("blob.tmp");
        std::fs::write(&tmp, &data).unwrap();
        let sum = run(Command::new("sha256sum").arg(&tmp));
        let digest = sum.split_whitespace().next().unwrap().to_string();
        std::fs::rename(&tmp, layout.join("blobs/sha256").join(&digest)).unwrap();
        (format!("sha256:{digest}"), data.len())
    };
    let mut index = read_json(layout.join("index.json"));
    let entry = &mut index["manifests"][0];
    let mut manifest = read_json(blob_path(entry["digest"].as_str().unwrap()));
    let mut config = read_json(blob_path(manifest["config"]["digest"].as_str().unwrap()));
    config["config"]["Entrypoint"] = serde_json::json!(["/bin/sleep", "2000000000"]);
    config["config"]["Cmd"] = serde_json::Value::Null;
    let (cd, cs) = write_blob(&config);
    manifest["config"]["digest"] = cd.into();
    manifest["config"]["size"] = cs.into();
    let (md, ms) = write_blob(&manifest);
    entry["digest"] = md.into();
    entry["size"] = ms.into();
    entry["annotations"]["io.containerd.image.name"] = PAUSE_IMAGE.into();
    std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
    let tar = dir.join("pause.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&tar)
        .args(["oci-layout", "index.json", "blobs"]));
    tar
}

impl Cri {
    /// Makes the network namespace, starts containerd in it with the CRI
    /// plugin and imports the busybox and pause images.
    pub fn start(tag: &str) -> Cri {
        require_root();
        crate::leak::require_guard();
        let shim = shim_bin();
        for (bin, pkg) in [
            ("/usr/lib/cni/bridge", "containernetworking-plugins"),
            ("/usr/lib/cni/host-local", "containernetworking-plugins"),
            ("/usr/lib/cni/loopback", "containernetworking-plugins"),
            ("/usr/bin/containerd", "containerd"),
            ("/usr/bin/nsenter", "util-linux"),
        ] {
            assert!(
                Path::new(bin).exists(),
                "{bin} not found: apt-get install {pkg} (make setup)"
            );
        }
        let dir = TempDir::new(&format!("cri-{tag}"));
        let d = dir.path().to_path_buf();
        for sub in [
            "root", "state", "bin", "opt", "cni", "cni-ipam", "logs", "images",
        ] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        std::os::unix::fs::symlink(&shim, d.join("bin/containerd-shim-husk-v2")).unwrap();
        crate::write_husk_config(&d.join("husk.toml"));
        let cni_network = format!(
            "husk-cri-{}",
            d.file_name()
                .unwrap()
                .to_string_lossy()
                .replace("husk-test-", "")
        );
        std::fs::write(
            d.join("cni/10-husk-cri.conflist"),
            serde_json::json!({
                "cniVersion": "0.4.0",
                "name": cni_network,
                "plugins": [{
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": true,
                    "ipMasq": false,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": SUBNET}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": d.join("cni-ipam"),
                    }
                }]
            })
            .to_string(),
        )
        .unwrap();
        // A unique name of this test's: the tail of its temp dir.
        let unique = d.file_name().unwrap().to_string_lossy().to_string();
        let netns = unique.replace("husk-test-", "husk-");
        let cgroup_parent = format!("/{netns}");
        // The shim's root, short: a pod's sockets are `<root>/k8s.io/<64
        // hex id>/virtiofsd.sock`, within the 107 bytes of a socket path
        // (the default, /run/husk-shim, fits too).
        let shim_root = PathBuf::from(format!(
            "/run/hc-{}",
            unique.rsplit('-').take(2).collect::<Vec<_>>().join("-")
        ));
        std::fs::create_dir_all(&shim_root).unwrap();
        crate::leak::watch(shim_root.to_string_lossy().to_string());
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{d}/c.sock"
[debug]
  level = "info"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{HANDLER}]
      runtime_type = "io.containerd.husk.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{HANDLER}.options]
        ConfigPath = "{d}/husk.toml"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni"
    max_conf_num = 1
"#,
            d = d.display()
        );
        std::fs::write(d.join("containerd.toml"), config).unwrap();
        run(Command::new("ip").args(["netns", "add", &netns]));
        run(Command::new("ip").args(["-n", &netns, "link", "set", "lo", "up"]));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let sock = d.join("c.sock");
        // Connects lazily: every call dials the socket again if needed.
        let channel = {
            let _g = rt.enter();
            Endpoint::try_from("http://cri.invalid")
                .unwrap()
                .connect_with_connector_lazy(tower::service_fn(move |_: tonic::transport::Uri| {
                    let sock = sock.clone();
                    async move {
                        let s = tokio::net::UnixStream::connect(sock).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                    }
                }))
        };
        let mut c = Cri {
            dir,
            netns,
            cgroup_parent,
            shim_root,
            cni_network,
            child: None,
            rt,
            channel,
        };
        c.launch();
        let pause = pause_image(&c.dir.path().join("images"));
        for img in [busybox_image(), pause] {
            run(c.ctr().args(["images", "import"]).arg(&img));
        }
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
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg("containerd")
            .arg("--config")
            .arg(d.join("containerd.toml"))
            .env("PATH", path)
            .env("HUSK_SHIM_ROOT", &self.shim_root)
            .env_remove("HUSK_CONFIG")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("nsenter containerd");
        self.child = Some(child);
        let up = try_wait_until(Duration::from_secs(60), || {
            self.rt
                .block_on(self.runtime().version(cri::VersionRequest::default()))
                .is_ok()
        })
        .is_some();
        assert!(up, "containerd's CRI did not come up:\n{}", self.log_tail());
    }

    pub fn log_tail(&self) -> String {
        let data = std::fs::read(self.dir.path().join("containerd.log")).unwrap_or_default();
        let start = data.len().saturating_sub(8000);
        String::from_utf8_lossy(&data[start..]).to_string()
    }

    /// `ctr --address <socket> -n k8s.io`.
    pub fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(self.dir.path().join("c.sock"))
            .args(["-n", NAMESPACE]);
        c
    }

    pub fn runtime(&self) -> RuntimeServiceClient<Channel> {
        RuntimeServiceClient::new(self.channel.clone())
    }

    pub fn images(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(self.channel.clone())
    }

    /// Runs a CRI call to its end (at most `secs`).
    pub fn call<T>(
        &self,
        secs: u64,
        what: &str,
        f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, tonic::Status> {
        self.rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(secs), f).await })
            .unwrap_or_else(|_| panic!("CRI {what} did not answer within {secs} s"))
            .map(tonic::Response::into_inner)
    }

    /// Like [`call`](Self::call), failing the test on an error.
    #[track_caller]
    pub fn ok<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> T {
        match self.call(300, what, f) {
            Ok(v) => v,
            Err(e) => panic!(
                "CRI {what}: {} ({:?})\ncontainerd log:\n{}",
                e.message(),
                e.code(),
                self.log_tail()
            ),
        }
    }

    /// A pod's config: `name` (unique in the test), its hostname, its log
    /// directory and the test's cgroup parent.
    pub fn pod_config(&self, name: &str) -> cri::PodSandboxConfig {
        let logs = self.dir.path().join("logs").join(name);
        std::fs::create_dir_all(&logs).unwrap();
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{name}"),
                namespace: "default".into(),
                attempt: 0,
            }),
            hostname: format!("{name}-host"),
            log_directory: logs.to_string_lossy().into_owned(),
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: self.cgroup_parent.clone(),
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: cri::NamespaceMode::Pod as i32,
                        pid: cri::NamespaceMode::Container as i32,
                        ipc: cri::NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// RunPodSandbox with the `husk` handler; returns the pod's id.
    pub fn run_pod(&self, config: &cri::PodSandboxConfig) -> String {
        self.run_pod_with(config, HANDLER)
    }

    /// RunPodSandbox with runtime handler `handler` (`husk` or `runc`).
    pub fn run_pod_with(&self, config: &cri::PodSandboxConfig, handler: &str) -> String {
        let r = self.ok(
            "RunPodSandbox",
            self.runtime().run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: handler.into(),
            }),
        );
        crate::leak::watch(r.pod_sandbox_id.clone());
        r.pod_sandbox_id
    }

    pub fn pod_status(&self, pod: &str) -> cri::PodSandboxStatusResponse {
        self.ok(
            "PodSandboxStatus",
            self.runtime()
                .pod_sandbox_status(cri::PodSandboxStatusRequest {
                    pod_sandbox_id: pod.into(),
                    verbose: true,
                }),
        )
    }

    /// The pod's IP (the CNI bridge's address for it).
    pub fn pod_ip(&self, pod: &str) -> String {
        self.pod_status(pod)
            .status
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .unwrap_or_default()
    }

    /// A container of busybox running `args`, logging to `<name>.log`,
    /// with the namespace options kubelet gives every container of a pod
    /// without `shareProcessNamespace`: the pod's network and IPC, a PID
    /// namespace of its own. (CRI's default, an unset option, is `POD`.)
    pub fn container_config(name: &str, args: &[&str]) -> cri::ContainerConfig {
        cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: IMAGE.into(),
                ..Default::default()
            }),
            args: args.iter().map(|s| s.to_string()).collect(),
            log_path: format!("{name}.log"),
            linux: Some(cri::LinuxContainerConfig {
                security_context: Some(cri::LinuxContainerSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: cri::NamespaceMode::Pod as i32,
                        pid: cri::NamespaceMode::Container as i32,
                        ipc: cri::NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// CreateContainer in `pod` (made from `pod_config`), then StartContainer.
    pub fn run_container(
        &self,
        pod: &str,
        pod_config: &cri::PodSandboxConfig,
        config: cri::ContainerConfig,
    ) -> String {
        let id = self.create_container(pod, pod_config, config);
        self.ok(
            "StartContainer",
            self.runtime().start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            }),
        );
        id
    }

    pub fn create_container(
        &self,
        pod: &str,
        pod_config: &cri::PodSandboxConfig,
        config: cri::ContainerConfig,
    ) -> String {
        let r = self.ok(
            "CreateContainer",
            self.runtime()
                .create_container(cri::CreateContainerRequest {
                    pod_sandbox_id: pod.into(),
                    config: Some(config),
                    sandbox_config: Some(pod_config.clone()),
                }),
        );
        crate::leak::watch(r.container_id.clone());
        r.container_id
    }

    pub fn container_status(&self, id: &str) -> cri::ContainerStatus {
        self.ok(
            "ContainerStatus",
            self.runtime()
                .container_status(cri::ContainerStatusRequest {
                    container_id: id.into(),
                    verbose: false,
                }),
        )
        .status
        .unwrap_or_else(|| panic!("ContainerStatus of {id} has no status"))
    }

    /// Waits until the container is in `state`; returns its status.
    pub fn wait_state(&self, id: &str, state: cri::ContainerState) -> cri::ContainerStatus {
        let mut last = None;
        let got = try_wait_until(Duration::from_secs(180), || {
            let s = self.container_status(id);
            let done = s.state == state as i32;
            last = Some(s.clone());
            done.then_some(s)
        });
        got.unwrap_or_else(|| {
            panic!(
                "container {id} did not become {state:?}: {last:?}\n{}",
                self.log_tail()
            )
        })
    }

    /// ExecSync `cmd` in container `id` with a timeout in seconds (0: none).
    pub fn exec_sync(
        &self,
        id: &str,
        cmd: &[&str],
        timeout: i64,
    ) -> Result<cri::ExecSyncResponse, tonic::Status> {
        self.call(
            300,
            "ExecSync",
            self.runtime().exec_sync(cri::ExecSyncRequest {
                container_id: id.into(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout,
            }),
        )
    }

    /// ExecSync that must succeed with exit 0; returns its stdout.
    #[track_caller]
    pub fn exec_ok(&self, id: &str, cmd: &[&str]) -> String {
        let r = self
            .exec_sync(id, cmd, 0)
            .unwrap_or_else(|e| panic!("ExecSync {cmd:?} in {id}: {}", e.message()));
        assert_eq!(
            r.exit_code,
            0,
            "ExecSync {cmd:?} in {id}: stdout {:?} stderr {:?}",
            String::from_utf8_lossy(&r.stdout),
            String::from_utf8_lossy(&r.stderr)
        );
        String::from_utf8_lossy(&r.stdout).into_owned()
    }

    /// StopPodSandbox then RemovePodSandbox (its containers go with it).
    pub fn stop_remove_pod(&self, pod: &str) {
        self.ok(
            "StopPodSandbox",
            self.runtime().stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: pod.into(),
            }),
        );
        self.ok(
            "RemovePodSandbox",
            self.runtime()
                .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                    pod_sandbox_id: pod.into(),
                }),
        );
    }

    pub fn list_pods(&self) -> Vec<String> {
        self.call(
            60,
            "ListPodSandbox",
            self.runtime()
                .list_pod_sandbox(cri::ListPodSandboxRequest::default()),
        )
        .map(|r| r.items.into_iter().map(|p| p.id).collect())
        .unwrap_or_default()
    }

    /// Shim processes serving this containerd.
    pub fn shims(&self) -> Vec<u32> {
        let sock = self.dir.path().join("c.sock").to_string_lossy().to_string();
        processes_mentioning(&sock)
            .into_iter()
            .filter(|(_, cmd)| cmd.contains("containerd-shim-husk-v2"))
            .map(|(p, _)| p)
            .collect()
    }

    /// QEMU processes of this containerd's pods.
    pub fn qemus(&self) -> Vec<u32> {
        let root = self.shim_root.to_string_lossy().to_string();
        processes_mentioning(&root)
            .into_iter()
            .filter(|(_, cmd)| cmd.contains("qemu-system"))
            .map(|(p, _)| p)
            .collect()
    }

    /// virtiofsd processes of this containerd's pods.
    pub fn virtiofsds(&self) -> Vec<u32> {
        let root = self.shim_root.to_string_lossy().to_string();
        processes_mentioning(&root)
            .into_iter()
            .filter(|(_, cmd)| cmd.contains("virtiofsd"))
            .map(|(p, _)| p)
            .collect()
    }

    /// Host memory of the pods: the proportional set size (PSS, from
    /// `/proc/PID/smaps_rollup`) of every QEMU, virtiofsd and shim of this
    /// containerd, in KiB, per kind.
    pub fn pss_kib(&self) -> Vec<(&'static str, u64)> {
        let pss = |pids: Vec<u32>| -> u64 {
            pids.iter()
                .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/smaps_rollup")).ok())
                .filter_map(|t| {
                    t.lines()
                        .find(|l| l.starts_with("Pss:"))
                        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                })
                .sum()
        };
        vec![
            ("qemu", pss(self.qemus())),
            ("virtiofsd", pss(self.virtiofsds())),
            ("shim", pss(self.shims())),
        ]
    }

    /// Network devices in the test's namespace of `kind` (`veth`, `bridge`...).
    pub fn links(&self, kind: &str) -> Vec<String> {
        run(Command::new("ip").args(["-n", &self.netns, "-o", "link", "show", "type", kind]))
            .lines()
            .filter_map(|l| l.split(':').nth(1).map(|n| n.trim().to_string()))
            .collect()
    }

    /// Pod network namespaces containerd keeps under its state dir.
    pub fn pod_netns(&self) -> Vec<PathBuf> {
        let dir = self
            .dir
            .path()
            .join("state/io.containerd.grpc.v1.cri/netns");
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect()
    }

    /// The dirs below the test's cgroup parent, in every v1 hierarchy and
    /// the unified one.
    pub fn cgroups(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for h in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let mut roots = vec![h.path().join(self.cgroup_parent.trim_start_matches('/'))];
            if h.file_name() == "unified" || h.path().join("cgroup.controllers").exists() {
                roots.push(h.path().join(self.cgroup_parent.trim_start_matches('/')));
            }
            for r in roots {
                for e in std::fs::read_dir(&r).into_iter().flatten().flatten() {
                    if e.path().is_dir() {
                        out.push(e.path());
                    }
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// Fails the test if anything of a pod is left: shims, QEMU, virtiofsd,
    /// mounts (the leak guard), pod state, veths, pod netns, cgroups.
    pub fn assert_no_leaks(&self) {
        let me: Vec<u32> = self.child.iter().map(|c| c.id()).collect();
        crate::leak::assert_clean_except(Duration::from_secs(30), &me);
        let shim_root = self.shim_root.clone();
        let pods = || -> Vec<PathBuf> {
            std::fs::read_dir(&shim_root)
                .into_iter()
                .flatten()
                .flatten()
                .flat_map(|ns| std::fs::read_dir(ns.path()).into_iter().flatten().flatten())
                .map(|e| e.path())
                .collect()
        };
        let _ = try_wait_until(Duration::from_secs(15), || pods().is_empty());
        assert!(pods().is_empty(), "pod state left: {:?}", pods());
        assert!(self.shims().is_empty(), "shims left: {:?}", self.shims());
        assert!(self.qemus().is_empty(), "QEMU left: {:?}", self.qemus());
        let veths = self.links("veth");
        assert!(veths.is_empty(), "veths left in {}: {veths:?}", self.netns);
        let netns = self.pod_netns();
        assert!(netns.is_empty(), "pod netns left: {netns:?}");
        let cgroups = self.cgroups();
        assert!(cgroups.is_empty(), "cgroups left: {cgroups:?}");
        // libcni's cache (not configurable in containerd 1.6): one file per
        // attachment, `<network>-<container id>-<ifname>`.
        let cached: Vec<PathBuf> = std::fs::read_dir("/var/lib/cni/results")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name().is_some_and(|n| {
                    n.to_string_lossy()
                        .starts_with(&format!("{}-", self.cni_network))
                })
            })
            .collect();
        assert!(cached.is_empty(), "CNI results left: {cached:?}");
    }

    /// The guest's boot id as seen from container `id`.
    pub fn boot_id(&self, id: &str) -> String {
        self.exec_ok(id, &["cat", "/proc/sys/kernel/random/boot_id"])
            .trim()
            .to_string()
    }

    /// Waits for `what` in container `id`'s log file (CRI format) and
    /// returns the log's lines as (stream, tag, text).
    pub fn wait_log(&self, path: &Path, what: &str) -> Vec<(String, String, String)> {
        wait_until(
            Duration::from_secs(60),
            &format!("{what:?} in {}", path.display()),
            || {
                std::fs::read_to_string(path)
                    .ok()
                    .filter(|t| t.contains(what))
            },
        );
        parse_cri_log(&std::fs::read_to_string(path).unwrap())
    }

    /// Stops and removes every pod left (a failed test's), then containerd.
    fn cleanup(&mut self) {
        if self.child.is_none() {
            return;
        }
        for pod in self.list_pods() {
            let _ = self.call(
                120,
                "StopPodSandbox",
                self.runtime().stop_pod_sandbox(cri::StopPodSandboxRequest {
                    pod_sandbox_id: pod.clone(),
                }),
            );
            let _ = self.call(
                120,
                "RemovePodSandbox",
                self.runtime()
                    .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                        pod_sandbox_id: pod,
                    }),
            );
        }
        for p in self.shims() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            if try_wait_until(Duration::from_secs(20), || {
                matches!(c.try_wait(), Ok(Some(_)))
            })
            .is_none()
            {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl Drop for Cri {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("containerd log:\n{}", self.log_tail());
        }
        self.cleanup();
        // What CRI left mounted under its state dir (pod netns, shm).
        let state = self.dir.path().to_string_lossy().to_string();
        if let Ok(m) = std::fs::read_to_string("/proc/self/mountinfo") {
            let mut points: Vec<&str> = m
                .lines()
                .filter_map(|l| l.split(' ').nth(4))
                .filter(|p| p.starts_with(&state))
                .collect();
            points.reverse();
            for p in points {
                let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        let _ = std::fs::remove_dir_all(&self.shim_root);
        // Empty cgroup dirs of the test's parent, deepest first.
        for h in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let root = h.path().join(self.cgroup_parent.trim_start_matches('/'));
            if root.is_dir() {
                let mut dirs = vec![root.clone()];
                let mut i = 0;
                while i < dirs.len() {
                    for e in std::fs::read_dir(&dirs[i]).into_iter().flatten().flatten() {
                        if e.path().is_dir() {
                            dirs.push(e.path());
                        }
                    }
                    i += 1;
                }
                for d in dirs.iter().rev() {
                    let _ = std::fs::remove_dir(d);
                }
            }
        }
    }
}

/// Reads a streaming session (Exec, Attach) from containerd's streaming
/// server at `url` as a client of the `v4.channel.k8s.io` WebSocket
/// protocol would, from inside the test's network namespace (the server
/// listens on its 127.0.0.1). Returns what each channel carried (1 stdout,
/// 2 stderr, 3 the status) once the server closes the stream.
pub fn stream(netns: &str, url: &str) -> std::collections::BTreeMap<u8, Vec<u8>> {
    use std::io::{Read, Write};
    let rest = url
        .strip_prefix("http://")
        .unwrap_or_else(|| panic!("streaming URL {url:?} is not http://"));
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let host = host.to_string();
    let path = path.to_string();
    let ns = format!("/run/netns/{netns}");
    std::thread::spawn(move || {
        let f = std::fs::File::open(&ns).unwrap();
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let mut s = std::net::TcpStream::connect(&host)
            .unwrap_or_else(|e| panic!("streaming server {host}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: aHVzay1jcmktc3RyZWFtIQ==\r\n\
             Sec-WebSocket-Protocol: v4.channel.k8s.io\r\n\r\n"
        )
        .unwrap();
        let mut data = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => data.extend_from_slice(&buf[..n]),
            }
        }
        let end = data
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no HTTP answer: {:?}", String::from_utf8_lossy(&data)));
        let head = String::from_utf8_lossy(&data[..end]).to_string();
        assert!(head.starts_with("HTTP/1.1 101"), "not upgraded: {head}");
        let mut frames = &data[end + 4..];
        let mut out = std::collections::BTreeMap::<u8, Vec<u8>>::new();
        while frames.len() >= 2 {
            let opcode = frames[0] & 0x0f;
            let (len, at) = match frames[1] & 0x7f {
                126 => (u16::from_be_bytes([frames[2], frames[3]]) as usize, 4),
                127 => (
                    u64::from_be_bytes(frames[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                n => (n as usize, 2),
            };
            let Some(payload) = frames.get(at..at + len) else {
                break;
            };
            if opcode == 8 {
                break;
            }
            if let Some((ch, body)) = payload.split_first() {
                out.entry(*ch).or_default().extend_from_slice(body);
            }
            frames = &frames[at + len..];
        }
        out
    })
    .join()
    .expect("the streaming client")
}

/// Splits a CRI log (`<RFC 3339 time> <stdout|stderr> <F|P> <text>` per
/// line) into (stream, tag, text); panics on a line not in that format.
pub fn parse_cri_log(text: &str) -> Vec<(String, String, String)> {
    text.lines()
        .map(|l| {
            let f: Vec<&str> = l.splitn(4, ' ').collect();
            assert_eq!(f.len(), 4, "not a CRI log line: {l:?}");
            let t = f[0];
            assert!(
                t.len() >= 20 && t.as_bytes()[4] == b'-' && t.as_bytes()[10] == b'T',
                "not an RFC 3339 time in {l:?}"
            );
            assert!(
                matches!(f[1], "stdout" | "stderr"),
                "no stream in CRI log line {l:?}"
            );
            assert!(matches!(f[2], "F" | "P"), "no tag in CRI log line {l:?}");
            (f[1].to_string(), f[2].to_string(), f[3].to_string())
        })
        .collect()
}

/// The env of a container config from pairs.
pub fn envs(pairs: &[(&str, &str)]) -> Vec<cri::KeyValue> {
    pairs
        .iter()
        .map(|(k, v)| cri::KeyValue {
            key: k.to_string(),
            value: v.to_string(),
        })
        .collect()
}

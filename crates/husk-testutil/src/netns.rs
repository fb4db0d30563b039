//! A network namespace a test makes for itself (`ip netns add`) and
//! removes on drop, with commands run inside it through `nsenter
//! --net=/run/netns/NAME` (not `ip netns exec`, which remounts `/sys` and
//! so hides the cgroup mounts from runc, conmon and containerd). Every
//! bridge, veth and address a test makes lives in one of these, never in
//! the host's own namespace.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct TestNetns {
    name: String,
}

impl TestNetns {
    /// `husk-<tag>-<pid>-<n>`, with `lo` up.
    pub fn new(tag: &str) -> TestNetns {
        let name = format!(
            "husk-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("ip (iproute2; make setup installs it)");
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ns = TestNetns { name };
        ns.sh("ip link set lo up");
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        c
    }

    /// Runs `sh -c script` inside; fails the test unless it succeeds.
    #[track_caller]
    pub fn sh(&self, script: &str) -> String {
        let out = self.try_sh(script);
        assert!(
            out.status.success(),
            "in netns {}: `{script}` failed: {}{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `sh -c script` inside and returns its output, whatever it is.
    pub fn try_sh(&self, script: &str) -> Output {
        self.command("sh")
            .args(["-c", script])
            .output()
            .expect("nsenter")
    }

    /// What husk would leave here: its taps and any ingress qdisc.
    pub fn husk_traces(&self) -> Vec<String> {
        husk_traces_in(&self.path())
    }
}

/// Taps named `husktap*` and ingress qdiscs in the namespace at `path`.
pub fn husk_traces_in(path: &std::path::Path) -> Vec<String> {
    let run = |args: &[&str]| {
        Command::new("nsenter")
            .arg(format!("--net={}", path.display()))
            .arg("--")
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let mut found: Vec<String> = run(&["ip", "-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n.starts_with("husktap"))
        .map(|n| format!("tap {n}"))
        .collect();
    found.extend(
        run(&["tc", "qdisc", "show"])
            .lines()
            .filter(|l| l.starts_with("qdisc ingress"))
            .map(|l| l.to_string()),
    );
    found
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
